"""A stand-in for the Hugging Face Hub's HTTP API, enough for `tinkerlm.store.pull("hf:...")` and
`tinkerlm.export.push.push(...)` in tests.

Serves, on 127.0.0.1 and a free port, from repos held in memory. Reading (pulls):
    GET /api/models/ORG/REPO[/revision/REV]?blobs=True   what `HfApi.model_info(..., files_metadata=True)` reads
    GET /ORG/REPO/resolve/REV/FILE                       file bytes, with Content-Length and Range support
Writing (what huggingface_hub's `create_repo` and `create_commit` send, over the LFS protocol; Xet storage is not
served, so push tests set `HF_HUB_DISABLE_XET`):
    POST /api/repos/create                               {"name", "organization", "visibility"} -> {"url"}; 409 if
                                                         the repo exists
    POST /api/validate-yaml                              README.md front matter: 400 with errors if it is not YAML
    POST /api/models/ORG/REPO/preupload/REV              per file: uploadMode "lfs" (LFS suffixes, or binary
                                                         sample) or "regular"
    POST /ORG/REPO.git/info/lfs/objects/batch            upload actions pointing back here (basic transfer)
    PUT  /lfs-upload/OID                                 the object's bytes, checked against its sha256
    POST /api/models/ORG/REPO/commit/REV                 the NDJSON commit: header, file (base64) and lfsFile lines
With `token` set, every write needs `Authorization: Bearer TOKEN` (else HTTP 401, as the Hub answers).
Knobs to test failure handling: advertise a wrong sha256 for some files, drop the connection after N bytes
for the first K file requests, and (a hostile endpoint) stream far more bytes than a file's listed size.
"""

from __future__ import annotations

import base64
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
    private: bool = False


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
    token: str | None = None  # writes need "Authorization: Bearer <token>" when set
    lfs: dict[str, bytes] = field(default_factory=dict)  # LFS objects received: sha256 hex -> bytes
    commits: list[dict] = field(default_factory=list)  # {"repo", "header", "files": {path: bytes}, "lfs": [...]}
    writes: list[tuple[str, str]] = field(default_factory=list)  # (method, path) of every write request

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
        return {"id": repo_id, "sha": repo.sha, "private": repo.private, "siblings": siblings}

    def commit(self, repo_id: str, lines: list[dict]) -> tuple[int, dict]:
        """Apply an NDJSON commit to a repo: (status, answer) as the Hub's commit endpoint gives them."""
        repo = self.repos.get(repo_id)
        if repo is None:
            return 404, {"error": "Repository not found"}
        if not lines or lines[0].get("key") != "header":
            return 400, {"error": "the first line must be the header"}
        files: dict[str, bytes] = {}
        lfs_ops = []
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                data = self.lfs.get(value.get("oid"))
                if data is None or len(data) != value.get("size"):
                    return 422, {"error": f"LFS object {value.get('oid')} for {value.get('path')} was not uploaded"}
                files[value["path"]] = data
                lfs_ops.append(value)
            else:
                return 400, {"error": f"unsupported commit operation {key!r}"}
        repo.files.update(files)
        repo.sha = hashlib.sha1(repo.sha.encode() + json.dumps(sorted(files)).encode()).hexdigest()
        self.commits.append({"repo": repo_id, "header": lines[0]["value"], "files": files, "lfs": lfs_ops})
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{repo.sha}", "commitOid": repo.sha}


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

        def _body(self) -> bytes:
            """The request body: Content-Length bytes, or a chunked transfer decoded."""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _authorised(self) -> bool:
            if hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._json(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def do_POST(self) -> None:
            path = unquote(urlparse(self.path).path)
            body = self._body()
            hub.writes.append(("POST", path))
            if path == "/api/validate-yaml":
                self._validate_yaml(json.loads(body))
                return
            if not self._authorised():
                return
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req.get('organization')}/{req.get('name')}"
                if repo_id in hub.repos:
                    self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                    return
                hub.repos[repo_id] = Repo(files={}, private=req.get("visibility") == "private")
                self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                return
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/(.+)", path):
                repo = hub.repos.get(m.group(1))
                if repo is None:
                    self._json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return
                answer = []
                for f in json.loads(body)["files"]:
                    binary = b"\0" in base64.b64decode(f["sample"])
                    lfs = f["path"].endswith(repo.lfs_suffixes) or binary
                    answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False})
                self._json(200, {"files": answer, "commitOid": repo.sha})
                return
            if m := re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path):
                req = json.loads(body)
                objects = []
                for o in req["objects"]:
                    entry = {"oid": o["oid"], "size": o["size"]}
                    if o["oid"] not in hub.lfs:  # already held: no actions, the client skips the upload
                        entry["authenticated"] = True
                        entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}
                    objects.append(entry)
                self._json(
                    200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"}
                )
                return
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/(.+)", path):
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                status, answer = hub.commit(m.group(1), lines)
                self._json(status, answer)
                return
            self._json(404, {"error": "not found"})

        def do_PUT(self) -> None:
            path = unquote(urlparse(self.path).path)
            body = self._body()
            hub.writes.append(("PUT", path))
            if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
                if hashlib.sha256(body).hexdigest() != m.group(1):
                    self._json(400, {"error": "sha256 of the body does not match the object id"})
                    return
                hub.lfs[m.group(1)] = body
                self._send(200, b"")
                return
            self._json(404, {"error": "not found"})

        def _validate_yaml(self, req: dict) -> None:
            import yaml

            content = req.get("content", "")
            if content.startswith("---\n"):
                try:
                    yaml.safe_load(content.split("\n---\n", 1)[0][4:])
                except yaml.YAMLError as e:
                    self._json(400, {"errors": [{"message": str(e)}], "warnings": []})
                    return
            self._json(200, {"errors": [], "warnings": []})

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
