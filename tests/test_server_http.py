"""The real server under gunicorn: every answer is JSON, including the ones gunicorn writes itself."""
from __future__ import annotations

import json
import socket

import pytest
import requests

from deploy.server_process import ServerProcess, free_port
from emulation.deployment import enrollment
from tests.server_fixtures import HttpTransport, enroll, init_small_population, write_small_config

pytestmark = pytest.mark.slow


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
    assert r.status_code == 401                      # authentication is checked first ...
    dev = enroll(HttpTransport(server.url), "en", enrollment(server.config, "en")).body
    auth = {"Authorization": f"Bearer {dev['device_id']}:{dev['secret']}"}
    r = requests.post(server.url + "/v1/checkin", data=b"{}", headers={**auth, "Content-Type": "text/plain"},
                      timeout=10)
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")   # ... then the type
