"""Servers for the remote shard tests, each on 127.0.0.1, started here and stopped after.

``nginx``: Debian's nginx serving a folder (master process off: one process, as
this user).  ``s3``: moto's S3 server in a process of its own, with the standard
AWS variables pointed at it.  ``flaky``: a small range-serving HTTP server that
fails the requests it is told to (500s, dropped connections, 403s), for retries.
"""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within 30 s")


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="session")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(base URL, folder it serves)``."""
    if _NGINX is None:
        pytest.skip("nginx is not installed (scripts/bootstrap installs nginx-light as root)")
    root = tmp_path_factory.mktemp("nginx")
    www = root / "www"
    www.mkdir()
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(
        f"""
        daemon off;
        master_process off;
        worker_processes 1;
        error_log {root}/error.log;
        pid {root}/nginx.pid;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {root}/body;
            proxy_temp_path {root}/proxy;
            fastcgi_temp_path {root}/fastcgi;
            uwsgi_temp_path {root}/uwsgi;
            scgi_temp_path {root}/scgi;
            server {{
                listen 127.0.0.1:{port};
                root {www};
            }}
        }}
        """
    )
    proc = subprocess.Popen(
        [_NGINX, "-p", str(root), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc, "nginx")
        yield f"http://127.0.0.1:{port}", www
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint of a moto S3 server (its own process)."""
    pytest.importorskip("moto.server")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc, "moto's S3 server")
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A boto3 S3 client on the moto server, with the AWS variables iopipe reads set."""
    boto3 = pytest.importorskip("boto3")
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with ranges; ``server.faults`` says how to fail the next requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _fault(self) -> bool:
        srv: Any = self.server
        with srv.lock:
            srv.requests.append(self.command)
            fault = srv.faults.pop(0) if srv.faults else None
        if fault is None:
            return False
        if fault == "reset":
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return True
        self.send_response(int(fault))
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def _serve(self, body: bool) -> None:
        if self._fault():
            return
        srv: Any = self.server
        data = srv.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, len(data) - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            start, end = int(a), min(int(b) if b else end, end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if body:
            self.wfile.write(data[start : end + 1])

    def do_GET(self) -> None:
        self._serve(True)

    def do_HEAD(self) -> None:
        self._serve(False)


@pytest.fixture
def flaky() -> Iterator[Any]:
    """A threaded HTTP server on 127.0.0.1: set ``.files`` and ``.faults``; ``.url``."""
    srv: Any = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    srv.daemon_threads = True
    srv.files, srv.faults, srv.requests, srv.lock = {}, [], [], threading.Lock()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    t = threading.Thread(target=srv.serve_forever, name="flaky-http", daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(10)
