"""gunicorn's threaded worker, made to read each request whole before a thread sees it.

Why: gunicorn's gthread worker hands a connection to a thread as soon as its
first bytes arrive, and the thread reads the rest of the headers and the body
with a blocking read that has no deadline. A client that sends headers
announcing a body, one byte of it, and stalls holds a thread for ever: forty
of them took the server down (issue 30). This worker's event loop (the
selector gthread already runs to accept connections and watch kept-alive
ones) reads every request — head and body — without blocking, into a buffer
(memory, then an anonymous temporary file beyond SPOOL_BYTES), and hands the
connection to a thread only once the request is complete. A stalled client
then costs a socket and the bytes it sent, never a thread; a worker keeps up
to gunicorn's `worker_connections` of them. On the way the loop

* refuses a body over its route's limit (the app's `nightjar_body_limit`:
  server.app) with 413 and `Connection: close` as soon as Content-Length or
  the chunks so far exceed it, before reading it;
* gives the head HEAD_TIMEOUT_S from its first byte and never lets a body
  sit idle longer than BODY_IDLE_S (408, then close); closes a connection
  idle between requests after gunicorn's `keepalive`;
* answers `Expect: 100-continue` itself (the body would not come otherwise);
* after an error answer, half-closes and reads what the client still sends
  for up to LINGER_S, so the client reads the answer instead of a reset.

A thread writes its response with SEND_TIMEOUT_S on each write, so a client
that stops reading frees its thread too. Plain HTTP/1.x only: TLS ends at the
front (server/README.md). Errors gunicorn answers itself — a request line or
headers over its limits (414, 431), a malformed request (400) — are written
as JSON `{"error", "message"}` with the protocol's codes, like every other
error of this server.
"""
from __future__ import annotations

import errno
import io
import json
import re
import selectors
import socket
import tempfile
import time
from collections.abc import Callable
from functools import partial

from gunicorn import util
from gunicorn.http.errors import NoMoreData
from gunicorn.http.parser import RequestParser
from gunicorn.workers.gthread import TConn, ThreadWorker

from contract.protocol.errors import ErrorCode

_CODES = {400: ErrorCode.BAD_REQUEST, 403: ErrorCode.FORBIDDEN, 408: ErrorCode.REQUEST_TIMEOUT,
          413: ErrorCode.PAYLOAD_TOO_LARGE, 414: ErrorCode.URI_TOO_LONG, 431: ErrorCode.HEADERS_TOO_LARGE}
HEAD_TIMEOUT_S = 30.0      # the whole head, from its first byte (nginx's client_header_timeout: 60 s)
BODY_IDLE_S = 30.0         # between two reads of a body (nginx's client_body_timeout: 60 s)
SEND_TIMEOUT_S = 60.0      # one write of a response
LINGER_S = 2.0             # reading (and dropping) what a refused client still sends
SPOOL_BYTES = 128 * 1024   # a request beyond this waits in an anonymous temporary file
RECV_BYTES = 256 * 1024
LINE_LIMIT = 4096          # a chunk-size line or a trailer line
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    code = _CODES.get(status_int, ErrorCode.INTERNAL_ERROR if status_int >= 500 else ErrorCode.BAD_REQUEST)
    body = json.dumps({"error": code.value, "message": mesg or reason}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)


class RequestReader:
    """One request's bytes as they arrive, and whether they make up the whole request yet.

    `feed(data)` answers MORE, COMPLETE, MALFORMED (framing gunicorn's parser
    will refuse: the thread answers 400), TOO_LARGE (a body over `limit`) or
    HEAD_TOO_LARGE. The request is in `spool` (an `Expect` header removed:
    the loop answers it); bytes after it (a pipelined request) in `extra`.
    """
    MORE, COMPLETE, MALFORMED, TOO_LARGE, HEAD_TOO_LARGE = "more", "complete", "malformed", "too_large", "head"

    def __init__(self, body_limit: Callable[[str, str], int], head_limit: int):
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
        self.extra = b""
        self.started: float | None = None     # when the first byte came
        self.head_read = False
        self.limit = 0
        self.expect_continue = False
        self._body_limit, self._head_limit = body_limit, head_limit
        self._head = bytearray()
        self._length: int | None = None       # body bytes still to come (None: chunked, or no head yet)
        self._chunked = False
        self._line = bytearray()               # a chunk-size or trailer line in progress
        self._chunk_left = 0                   # data and CRLF left of the current chunk
        self._decoded = self._raw = 0
        self._trailer = False

    def feed(self, data: bytes) -> str:
        if self.started is None:
            self.started = time.monotonic()
        if not self.head_read:
            return self._feed_head(data)
        return self._feed_chunked(data) if self._chunked else self._feed_length(data)

    def _feed_head(self, data: bytes) -> str:
        searched = max(0, len(self._head) - 3)
        self._head += data
        while self._head.startswith(b"\r\n"):      # empty lines before a request line are ignored
            del self._head[:2]
            searched = 0
        end = self._head.find(b"\r\n\r\n", searched)
        if end < 0:
            return self.HEAD_TOO_LARGE if len(self._head) > self._head_limit else self.MORE
        head, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
        self._head = bytearray()
        lines = head.split(b"\r\n")
        parts = lines[0].decode("latin-1").split(" ")
        fields = [line.partition(b":") for line in lines[1:]]
        if len(parts) != 3 or any(not sep for _, sep, _ in fields):
            return self._malformed(head + b"\r\n\r\n" + rest)
        method, target, version = parts
        values = {}
        for name, _, value in fields:
            values.setdefault(name.strip().lower(), []).append(value.strip().lower())
        lengths, codings = values.get(b"content-length", []), b",".join(values.get(b"transfer-encoding", []))
        self.limit = self._body_limit(method, target)
        if codings:
            if lengths or version != "HTTP/1.1" or codings.split(b",")[-1].strip() != b"chunked":
                return self._malformed(head + b"\r\n\r\n" + rest)
            self._chunked = True
        elif len(set(lengths)) > 1 or (lengths and not lengths[0].isdigit()):
            return self._malformed(head + b"\r\n\r\n" + rest)
        else:
            self._length = int(lengths[0]) if lengths else 0
            if self._length > self.limit:
                return self.TOO_LARGE
        if b"100-continue" in values.get(b"expect", []) and version == "HTTP/1.1":
            self.expect_continue = self._chunked or self._length > 0
            lines = lines[:1] + [line for line, (name, _, _) in zip(lines[1:], fields)
                                 if name.strip().lower() != b"expect"]
        self.spool.write(b"\r\n".join(lines) + b"\r\n\r\n")
        self.head_read = True
        return self._feed_chunked(rest) if self._chunked else self._feed_length(rest)

    def _malformed(self, data: bytes) -> str:
        self.spool.write(data)
        return self.MALFORMED

    def _feed_length(self, data: bytes) -> str:
        take = min(len(data), self._length)
        self.spool.write(data[:take])
        self._length -= take
        if self._length:
            return self.MORE
        self.extra = data[take:]
        return self.COMPLETE

    def _feed_chunked(self, data: bytes) -> str:
        self._raw += len(data)
        if self._raw > 2 * self.limit + LINE_LIMIT * 16:    # chunk lines and trailers count too
            return self.TOO_LARGE
        pos = 0
        while pos < len(data):
            if self._chunk_left:
                take = min(self._chunk_left, len(data) - pos)
                self._chunk_left -= take
                pos += take
                continue
            end = data.find(b"\n", pos)
            self._line += data[pos:len(data) if end < 0 else end + 1]
            pos = len(data) if end < 0 else end + 1
            if len(self._line) > LINE_LIMIT:
                return self._malformed(data)
            if end < 0:
                break
            line = bytes(self._line).rstrip(b"\r\n")
            self._line.clear()
            if self._trailer:
                if not line:
                    self.spool.write(data[:pos])
                    self.extra = data[pos:]
                    return self.COMPLETE
                continue
            size_text = line.split(b";")[0].strip()
            if not _HEX.fullmatch(size_text):
                return self._malformed(data)
            size = int(size_text, 16)
            self._decoded += size
            if self._decoded > self.limit:
                return self.TOO_LARGE
            self._trailer = size == 0                # the last chunk: trailer lines up to an empty one
            self._chunk_left = size + 2 if size else 0
        self.spool.write(data)
        return self.MORE


class SpooledSource:
    """What gunicorn's parser reads a buffered request from (it only calls `recv`): the spool, then EOF."""

    def __init__(self, spool):
        self._spool = spool
        spool.seek(0)

    def recv(self, size: int) -> bytes:
        return self._spool.read(size)


class RequestBufferingWorker(ThreadWorker):
    """`worker_class = "server.worker.RequestBufferingWorker"` (what `python -m server run` uses).

    Connections waiting for (the rest of) a request are `_reading`, each with
    its RequestReader and a deadline; `lingering` ones were refused and are
    being drained before they close. A complete request goes to a thread with
    the parser reading from its spool; after the response, a kept-alive
    connection comes back here for the next one.
    """

    def init_process(self):
        util.write_error = write_json_error
        self._reading: dict[TConn, None] = {}      # insertion-ordered set
        super().init_process()

    def load_wsgi(self):
        super().load_wsgi()
        limit = getattr(self.wsgi, "extensions", {}).get("nightjar_body_limit")
        self._body_limit = limit or (lambda method, target: 1 << 30)
        cfg = self.cfg
        self._head_limit = (cfg.limit_request_line or 8190) + 4 + (cfg.limit_request_fields or 100) * (
            (cfg.limit_request_field_size or 8190) + 2)

    def accept(self, listener):
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, client, listener.getsockname())     # non-blocking
        conn.lingering = False
        self._await_request(conn, b"", HEAD_TIMEOUT_S)

    def _await_request(self, conn: TConn, carry: bytes, idle_s: float) -> None:
        conn.reader = RequestReader(self._body_limit, self._head_limit)
        conn.deadline = time.monotonic() + idle_s
        self._reading[conn] = None
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))
        if carry:
            self._feed(conn, carry)

    def _readable(self, conn: TConn, _sock) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
        elif not conn.lingering:
            self._feed(conn, data)

    def _feed(self, conn: TConn, data: bytes) -> None:
        reader = conn.reader
        outcome = reader.feed(data)
        if outcome == reader.MORE:
            conn.deadline = (time.monotonic() + BODY_IDLE_S if reader.head_read
                             else reader.started + HEAD_TIMEOUT_S)
            if reader.expect_continue:
                reader.expect_continue = False
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        elif outcome in (reader.COMPLETE, reader.MALFORMED):
            self._dispatch(conn)
        elif outcome == reader.TOO_LARGE:
            self._refuse(conn, 413, "Payload Too Large", f"the body is over this endpoint's limit of "
                                                          f"{reader.limit} bytes")
        else:
            self._refuse(conn, 431, "Request Header Fields Too Large",
                         f"the request head is over {self._head_limit} bytes")

    def _dispatch(self, conn: TConn) -> None:
        """The request is all here: to a thread, the parser reading it from the spool."""
        self._unwatch(conn)
        source = SpooledSource(conn.reader.spool)
        if conn.parser is None:
            conn.parser = RequestParser(self.cfg, source, conn.client)
        else:                  # each request is parsed from its own bytes, nothing left of the one before
            conn.parser.unreader.sock = source
            conn.parser.unreader.buf = io.BytesIO()
        conn.initialized = conn.data_ready = True
        self.enqueue_req(conn)

    def handle(self, conn: TConn):
        """In a thread: serve the one buffered request; keep-alive is safe, its body is all local."""
        req = None
        try:
            conn.sock.settimeout(SEND_TIMEOUT_S)
            req = next(conn.parser)
            return bool(req and self.handle_request(req, conn) and conn.parser.finish_body())
        except (NoMoreData, StopIteration):
            return False
        except OSError as e:          # the client went away or stopped reading (SEND_TIMEOUT_S)
            self.log.debug("socket error serving a request: %s", e)
            return False
        except Exception as e:
            self.handle_error(req, conn.sock, conn.client, e)
            return False

    def finish_request(self, conn: TConn, fs) -> None:
        try:
            keepalive = not fs.cancelled() and fs.result()
        except Exception:
            keepalive = False
        conn.reader.spool.close()
        if not keepalive or not self.alive:
            self._linger(conn)
            return
        try:
            conn.sock.setblocking(False)
        except OSError:
            self._close(conn)
            return
        self._await_request(conn, conn.reader.extra, self.cfg.keepalive)

    def murder_pending(self):
        """Each turn of the loop: connections past their deadline (or idle ones, when stopping) go."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self._reading if c.deadline <= now or (not self.alive and not c.reader.started)]:
            if conn.lingering or conn.reader.started is None:
                self._close(conn)
            else:
                self._refuse(conn, 408, "Request Timeout", "the request did not arrive in time")

    def _refuse(self, conn: TConn, status: int, reason: str, message: str) -> None:
        try:
            write_json_error(conn.sock, status, reason, message)
        except OSError:
            pass
        self._linger(conn)

    def _linger(self, conn: TConn) -> None:
        """Half-close, then drop what the client still sends until it closes or LINGER_S pass."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        conn.deadline = time.monotonic() + LINGER_S
        if conn not in self._reading:
            self._reading[conn] = None
            self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))

    def _send(self, conn: TConn, data: bytes) -> None:
        try:
            conn.sock.send(data)
        except OSError:
            pass

    def _unwatch(self, conn: TConn) -> None:
        if self._reading.pop(conn, False) is None:
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _close(self, conn: TConn) -> None:
        self._unwatch(conn)
        conn.reader.spool.close()
        self.nr_conns -= 1
        conn.close()
