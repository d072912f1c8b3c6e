"""A stand-in for the Hugging Face Hub's HTTP API, enough for `tinkerlm.store.pull("hf:...")` in tests.

Serves, on 127.0.0.1 and a free port, from repos held in memory:
    GET /api/models/ORG/REPO[/revision/REV]?blobs=True   what `HfApi.model_info(..., files_metadata=True)` reads
    GET /ORG/REPO/resolve/REV/FILE                       file bytes, with Content-Length and Range support
Knobs to test failure handling: advertise a wrong sha256 for some files, drop the connection after N bytes
for the first K file requests, and (a hostile endpoint) stream far more bytes than a file's listed size.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    lfs_suffixes: tuple[str, ...] = (".safetensors", ".gguf")


@dataclass
class HubServer:
    """Use as a context manager; `url` is the endpoint to put in `HF_ENDPOINT`."""

    repos: dict[str, Repo] = field(default_factory=dict)
    wrong_sha: set[str] = field(default_factory=set)  # file names advertised with a wrong lfs.sha256
    drop_after: int | None = None  # bytes of a file body sent before the connection is dropped ...
    drop_times: int = 0  # ... for this many file requests
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    flood: dict[str, int] = field(
        default_factory=dict
    )  # file name -> bytes streamed for it instead (listing unchanged)
    sent: dict[str, int] = field(default_factory=dict)  # file name -> bytes of a flood the client accepted

    def __enter__(self) -> HubServer:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def info(self, repo_id: str, rev: str | None) -> dict | None:
        repo = self.repos.get(repo_id)
        if repo is None or rev not in (None, "main", repo.sha):
            return None
        siblings = []
        for name, data in sorted(repo.files.items()):
            s = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(repo.lfs_suffixes):
                sha = hashlib.sha256(data).hexdigest()
                if name in self.wrong_sha:
                    sha = hashlib.sha256(data + b"x").hexdigest()
                s["lfs"] = {"sha256": sha, "size": len(data), "pointerSize": 134}
            siblings.append(s)
        return {"id": repo_id, "sha": repo.sha, "private": False, "siblings": siblings}


def _handler(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def do_GET(self) -> None:
            path = unquote(urlparse(self.path).path)
            hub.requests.append((path, self.headers.get("Range")))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                info = hub.info(m.group(1), m.group(2))
                if info is None:
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                else:
                    self._json(200, info)
                return
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                repo = hub.repos.get(m.group(1))
                data = repo.files.get(m.group(3)) if repo and m.group(2) in ("main", repo.sha) else None
                if data is None:
                    self._json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    return
                if m.group(3) in hub.flood:
                    self._flood(m.group(3), hub.flood[m.group(3)])
                    return
                self._file(data)
                return
            self._json(404, {"error": "not found"})

        def _flood(self, name: str, total: int) -> None:
            """Stream `total` bytes (as one declared body), until done or the client hangs up."""
            self.send_response(200)
            self.send_header("Content-Length", str(total))
            self.end_headers()
            chunk = b"\0" * (1 << 16)
            hub.sent[name] = 0
            try:
                while hub.sent[name] < total:
                    n = min(len(chunk), total - hub.sent[name])
                    self.wfile.write(chunk[:n])
                    hub.sent[name] += n
            except OSError:  # the client closed the connection: what a download that stops looks like
                pass
            self.close_connection = True

        def _file(self, data: bytes) -> None:
            start, status, headers = 0, 200, {"Accept-Ranges": "bytes"}
            if r := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")):
                start, status = int(r.group(1)), 206
                if start >= len(data):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                    return
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            body = data[start:]
            if hub.drop_times > 0 and hub.drop_after is not None and len(body) > hub.drop_after:
                hub.drop_times -= 1
                self.send_response(status)
                for k, v in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[: hub.drop_after])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the client sees EOF before Content-Length
                self.close_connection = True
                return
            self._send(status, body, headers)

    return Handler
