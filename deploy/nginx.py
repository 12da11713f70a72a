"""nginx (Debian's package) in front of the replicas: one upstream, connection failures retried elsewhere.

A request nginx could not hand to a replica (refused, reset before a response
header) goes to the next one; a POST already sent is not repeated by nginx
(its default for non-idempotent requests): the device retries it, and the
protocol makes that safe (an upload is idempotent per session).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TEMP_DIRS = ("body", "proxy", "fastcgi", "uwsgi", "scgi")


class NginxUnavailable(RuntimeError):
    pass


def binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
    if found is None:
        raise NginxUnavailable("no nginx: install Debian's `nginx` package")
    return found


def write_config(root: Path, listen_port: int, upstream_ports: list[int], max_body_mb: int = 64) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for d in TEMP_DIRS:
        (root / d).mkdir(exist_ok=True)
        if os.geteuid() == 0:          # workers run as nobody: they must write request bodies here
            shutil.chown(root / d, "nobody")
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;" for p in upstream_ports)
    temp = "\n".join(f"    {d}_temp_path {root / d};" if d != "body" else f"    client_body_temp_path {root / d};"
                     for d in TEMP_DIRS)
    text = f"""# Written by deploy/nginx.py.
{"user nobody nogroup;" if os.geteuid() == 0 else ""}
daemon off;
worker_processes 1;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    client_max_body_size {max_body_mb}m;
    # uploads and downloads stream through, never to a temporary file (whose directory nginx's
    # unprivileged workers may not be able to reach)
    proxy_request_buffering off;
    client_body_buffer_size 1m;
    proxy_max_temp_file_size 0;
    upstream nightjar {{
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            proxy_pass http://nightjar;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_next_upstream error timeout http_502 http_503;
            proxy_next_upstream_tries 3;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(text)
    return path


def start(root: Path, config: Path) -> subprocess.Popen:
    exe = binary()
    check = subprocess.run([exe, "-t", "-p", str(root), "-c", str(config), "-e", str(root / "error.log")],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise NginxUnavailable(f"nginx refused {config}: {check.stderr.strip()}")
    log = open(root / "nginx.out", "ab")
    return subprocess.Popen([exe, "-p", str(root), "-c", str(config), "-e", str(root / "error.log")],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
