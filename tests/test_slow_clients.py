"""Slow clients cannot take the server down (issue 30), and the worker's request framing is exact.

The drill (benchmarks.slow_clients) against the real server started as
`python -m server run`: 200 connections from 127.0.0.1 send an upload's head
announcing 100,000 bytes and one body byte, then stall; meanwhile honest
devices, each from its own loopback address, enroll and check in. Every
check-in must complete, /healthz must answer and the 200 connections must
still be held open (so the drill really stalled them). The latency figure is
the benchmark's, not asserted here. A head or a body that stops coming is
answered 408 (JSON) once its time is up, and the connection closed.

server.worker.RequestReader decides when a request is whole before a thread
sees it: fed in pieces of every size, it must find the same end, never read
past it (a pipelined request stays for the next turn), and refuse what is over
the limit as soon as it knows.
"""
from __future__ import annotations

import json
import socket
import time

import pytest

from benchmarks.slow_clients import slow_client_drill
from deploy.server_process import ServerProcess, free_port
from emulation.deployment import enrollment
from server.worker import BODY_IDLE_S, HEAD_TIMEOUT_S, RequestReader
from tests.server_fixtures import init_small_population, write_small_config


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("slow")
    config = write_small_config(root)
    init_small_population(root, config)
    with ServerProcess(config, free_port(), root / "server.log", workers=2, threads=4) as running:
        yield running


@pytest.mark.slow
def test_200_stalled_connections_leave_check_ins_and_health_answered(server):
    got = slow_client_drill(stalled=200, devices=10, checkins_per_device=5, timeout_s=20.0, port=server.port,
                            enrollment=enrollment(server.config, "en"))
    assert got["stalled_connections"] == 200, got          # all held open and unanswered throughout
    assert got["honest_completed"] == got["honest_checkins"] == 50, got
    assert got["health_answered"], got


@pytest.mark.slow
def test_a_head_or_body_that_stops_coming_gets_a_json_408_and_the_connection_closes(server):
    stalled = {"head": b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Type: appl",
               "body": b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{"}
    socks = {}
    for name, data in stalled.items():
        socks[name] = socket.create_connection(("127.0.0.1", server.port), timeout=HEAD_TIMEOUT_S + 10)
        socks[name].sendall(data)
    started = time.monotonic()
    for name, sock in socks.items():
        with sock, sock.makefile("rb") as answer:
            status = answer.readline()
            headers = {k.lower(): v.strip() for k, _, v in (line.decode().partition(":") for line in
                                                              iter(answer.readline, b"\r\n"))}
            body = json.loads(answer.read(int(headers["content-length"])))
            assert status.split()[1] == b"408" and body["error"] == "request_timeout", (name, status, body)
            assert headers["connection"] == "close" and answer.read(1) == b""
    assert time.monotonic() - started >= min(HEAD_TIMEOUT_S, BODY_IDLE_S) - 1


LIMIT = 1000


def feed_in_pieces(data: bytes, size: int, limit: int = LIMIT) -> tuple[str, RequestReader]:
    reader = RequestReader(lambda method, target: limit, head_limit=4096)
    outcome = reader.MORE
    for i in range(0, len(data), size):
        outcome = reader.feed(data[i:i + size])
        if outcome != reader.MORE:
            break
    return outcome, reader


def spooled(reader: RequestReader) -> bytes:
    reader.spool.seek(0)
    return reader.spool.read()


NEXT = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
REQUESTS = {
    "no body": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "content-length": b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n{\"a\": 1234}",
    "chunked, extensions and a trailer": (b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                          b"5;name=value\r\nhello\r\n1A\r\n" + b"z" * 26 + b"\r\n0\r\n"
                                          b"X-Trailer: t\r\n\r\n"),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 10_000])
def test_a_request_is_whole_at_its_last_byte_and_not_before_whatever_the_pieces(name, size):
    request = REQUESTS[name]
    outcome, reader = feed_in_pieces(request + NEXT, size)
    assert outcome == reader.COMPLETE
    assert spooled(reader) == request
    assert NEXT.startswith(reader.extra)         # what was read past the end is the next request's start
    outcome, _ = feed_in_pieces(request[:-1], size)
    assert outcome == RequestReader.MORE         # one byte short is not whole


def test_expect_100_continue_is_the_loops_to_answer_and_leaves_the_head():
    outcome, reader = feed_in_pieces(b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                     b"Content-Length: 2\r\n\r\n", 5)
    assert (outcome, reader.expect_continue) == (reader.MORE, True)
    assert b"expect" not in spooled(reader).lower()
    assert reader.feed(b"{}") == reader.COMPLETE


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/checkin HTTP/1.1\r\nContent-Length: 1001\r\n\r\n",                     # announced
    b"POST /v1/checkin HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3E8\r\n" + b"x" * 1000
    + b"\r\n1\r\n",                                                                   # chunk sizes add up past it
    b"POST /v1/checkin HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    + (b"1;" + b"e" * 100 + b"\r\nx\r\n") * 700,                                       # chunk overhead counts too
], ids=["content-length", "chunk sizes", "chunk overhead"])
def test_a_body_over_the_limit_is_refused_as_soon_as_it_is_known(request_bytes):
    outcome, _ = feed_in_pieces(request_bytes, 3)
    assert outcome == RequestReader.TOO_LARGE
    outcome, _ = feed_in_pieces(request_bytes, 3, limit=10_000)
    assert outcome == RequestReader.MORE                             # the same bytes under a larger limit


@pytest.mark.parametrize("request_bytes", [
    b"GET\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nNo colon here\r\n\r\n",
], ids=["request line", "two lengths", "negative length", "unknown coding", "chunk size", "header line"])
def test_framing_the_parser_will_refuse_goes_to_it_at_once(request_bytes):
    outcome, reader = feed_in_pieces(request_bytes, 4)
    assert outcome == RequestReader.MALFORMED and spooled(reader) == request_bytes   # it answers 400


def test_a_head_that_never_ends_is_refused_at_the_head_limit():
    outcome, _ = feed_in_pieces(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 600, 100)
    assert outcome == RequestReader.HEAD_TOO_LARGE
