"""The real server under gunicorn: every answer is JSON, including the ones gunicorn writes itself."""
from __future__ import annotations

import json
import socket

import pytest
import requests

from deploy.server_process import ServerProcess, free_port
from emulation.deployment import enrollment
from tests.server_fixtures import PROTOCOL, HttpTransport, enroll, init_small_population, write_small_config

pytestmark = pytest.mark.slow
VERSION = "".join(f"{k}: {v}\r\n" for k, v in PROTOCOL.items()).encode()    # the device API's header line


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    config = write_small_config(root)
    init_small_population(root, config)
    with ServerProcess(config, free_port(), root / "server.log") as running:
        yield running


def raw_request(server: ServerProcess, head: bytes) -> tuple[int, dict, dict]:
    """Send raw bytes, read the whole answer: (status, headers, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


CASES = [
    ("a request line over gunicorn's limit", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
     414, "uri_too_long"),
    ("a header over gunicorn's limit", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
     431, "headers_too_large"),
    ("too many headers", b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-%d: y\r\n" % i for i in range(120)) + b"\r\n", 431, "headers_too_large"),
    ("a malformed request line", b"GET\r\n\r\n", 400, "bad_request"),
]


@pytest.mark.parametrize("name,request_bytes,status,code", CASES, ids=[c[0] for c in CASES])
def test_gunicorns_own_error_answers_are_json(server, name, request_bytes, status, code):
    got, headers, body = raw_request(server, request_bytes)
    assert (got, body["error"]) == (status, code), (name, body)
    assert headers["Content-Type"] == "application/json" and body["message"]


def test_every_error_from_flask_is_json_and_integers_beyond_any_range_are_4xx(server):
    for path in ("/v1/populations/en/rounds/" + "9" * 30, "/v1/populations/en/app-model/18446744073709551616",
                 "/v1/populations/en/rounds?limit=" + "9" * 30, "/nothing/here"):
        r = requests.get(server.url + path, timeout=10)
        assert 400 <= r.status_code < 500 and r.headers["Content-Type"] == "application/json"
        assert set(r.json()) == {"error", "message"}
    r = requests.post(server.url + "/v1/checkin", data=b"{}", headers={"Content-Type": "text/plain"},
                      timeout=10)
    assert (r.status_code, r.json()["error"]) == (400, "unsupported_protocol")   # the version first ...
    r = requests.post(server.url + "/v1/checkin", data=b"{}", headers={"Content-Type": "text/plain", **PROTOCOL},
                      timeout=10)
    assert r.status_code == 401                      # ... then authentication ...
    dev = enroll(HttpTransport(server.url), "en", enrollment(server.config, "en")).body
    auth = {"Authorization": f"Bearer {dev['device_id']}:{dev['secret']}"}
    r = requests.post(server.url + "/v1/checkin", data=b"{}",
                      headers={**auth, "Content-Type": "text/plain", **PROTOCOL}, timeout=10)
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")   # ... then the type


class Client:
    """One raw HTTP/1.1 connection: send bytes, read answers in turn (pipelined ones too)."""

    def __init__(self, server: ServerProcess):
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> tuple[int, dict, bytes]:
        """(status, headers by lower-case name, body) of the next response."""
        status_line = self.reader.readline()
        assert status_line, "connection closed before an answer"
        headers = {}
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip()
        return int(status_line.split()[1]), headers, self.reader.read(int(headers.get("content-length", 0)))

    def closed_by_server(self) -> bool:
        """Whether the server closes the connection (within 5 s) once it has answered."""
        self.sock.settimeout(5)
        try:
            return self.reader.read(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()
        self.sock.close()


def test_options_is_405_json_with_allow(server):
    for path, allowed in (("/healthz", {"GET", "HEAD"}), ("/v1/checkin", {"POST"})):
        r = requests.options(server.url + path, timeout=10)
        assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed"), r.text
        assert r.headers["Content-Type"] == "application/json"
        assert set(r.headers["Allow"].replace(" ", "").split(",")) == allowed
    assert "options" not in server.operator_get("/openapi.json").json()["paths"]["/healthz"]


@pytest.mark.parametrize("path,length", [("/v1/checkin", 64 * 1024 + 1),
                                         ("/v1/sessions/abc/update?model_version=0&num_examples=1", 32 * 2**20 + 1)])
def test_a_body_over_the_limit_is_413_json_with_connection_close_before_it_is_sent(server, path, length):
    with Client(server) as client:
        client.send(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {length}\r\n\r\n".encode())          # and no body at all
        status, headers, body = client.answer()
        assert (status, json.loads(body)["error"]) == (413, "payload_too_large")
        assert headers["connection"] == "close" and headers["content-type"] == "application/json"
        assert client.closed_by_server()


def test_a_chunked_body_over_the_limit_is_413_json_and_one_within_it_is_served(server):
    with Client(server) as client:
        client.send(b"POST /v1/enrollment/nonces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + b"8000\r\n" + b" " * 0x8000 + b"\r\n"
                    + b"8001\r\n" + b" " * 1000)
        status, headers, body = client.answer()
        assert (status, json.loads(body)["error"], headers["connection"]) == (413, "payload_too_large", "close")
        assert client.closed_by_server()
    payload = json.dumps({"population": "en"}).encode()
    with Client(server) as client:
        client.send(b"POST /v1/enrollment/nonces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + VERSION
                    + b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
        status, headers, body = client.answer()
        assert status == 201 and "nonce" in json.loads(body), body


def test_keep_alive_holds_after_an_error_that_left_a_body_unread_and_requests_may_be_pipelined(server):
    with Client(server) as client:
        body = b"\x00" * 200_000         # the server answers 401 without reading it
        client.send(b"POST /v1/sessions/abc/update?model_version=0&num_examples=1 HTTP/1.1\r\nHost: x\r\n" + VERSION
                    + b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        status, headers, _ = client.answer()
        assert (status, headers["connection"]) == (401, "keep-alive")
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
        assert [client.answer()[0] for _ in range(3)] == [200, 200, 200]


def test_expect_100_continue_is_answered_before_the_body_is_sent(server):
    payload = json.dumps({"population": "en"}).encode()
    with Client(server) as client:
        client.send(b"POST /v1/enrollment/nonces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + VERSION
                    + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(payload))
        assert client.reader.readline() == b"HTTP/1.1 100 Continue\r\n" and client.reader.readline() == b"\r\n"
        client.send(payload)
        status, _, body = client.answer()
        assert status == 201 and "nonce" in json.loads(body)
