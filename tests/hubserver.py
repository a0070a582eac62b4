"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the download tests: the routes huggingface_hub calls
(repo info, the file tree, file resolve with ETag and size headers, byte ranges), serving local folders as repos.
Unknown repos answer 404 with the Hub's X-Error-Code. It records each request (path, Authorization header), and
can send file bodies slowly (bytes_per_s) so that a test can cancel a download in the middle."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 64 << 10


class Repo:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
        self.folder = folder
        self.sha = hashlib.sha1(repo_id.encode()).hexdigest()  # the "commit" of main
        self.files = {f.relative_to(folder).as_posix(): f for f in sorted(folder.rglob("*")) if f.is_file()}
        self.etags = {rel: hashlib.sha256(f.read_bytes()).hexdigest() for rel, f in self.files.items()}


class HubServer:
    def __init__(self, repos: dict[str, Path], bytes_per_s: float | None = None):
        self.repos = {rid: Repo(rid, folder) for rid, folder in repos.items()}
        self.bytes_per_s = bytes_per_s
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        self.aborted: list[str] = []  # files whose download the client broke off
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="hub", daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def served(self, fragment: str) -> list[tuple[str, str, str | None]]:
        with self.lock:
            return [r for r in self.requests if fragment in r[1]]

    def _handler(self):
        return type("Handler", (_Handler,), {"hub": self})


class _Handler(BaseHTTPRequestHandler):
    """A Hub's HTTP answers for the repositories of `hub` (set by HubServer)."""

    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, status: int, body, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _missing(self, repo_id: str) -> None:
        self._json(404, {"error": f"Repository {repo_id} not found"}, {"X-Error-Code": "RepoNotFound"})

    def _find(self, path: str, marker: str) -> tuple[Repo | None, str, str]:
        """(repo, revision, rest) of ".../{org}/{name}/{marker}/{revision}/{rest}"."""
        head, _, tail = path.partition(f"/{marker}/")
        revision, _, rest = tail.partition("/")
        return self.hub.repos.get(head), revision, rest

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path, self.headers.get("Authorization")))
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            marker = "revision" if "/revision/" in rest else "tree"
            repo, _, _ = self._find(rest, marker)
            if repo is None:
                return self._missing(rest.partition(f"/{marker}/")[0])
            if marker == "revision":
                return self._json(200, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha,
                                        "private": False, "siblings": [{"rfilename": r} for r in repo.files]})
            return self._json(200, [{"type": "file", "path": rel, "size": f.stat().st_size,
                                     "oid": hashlib.sha1(rel.encode()).hexdigest(),
                                     "lfs": {"oid": repo.etags[rel], "size": f.stat().st_size,
                                             "pointerSize": 134}}
                                    for rel, f in repo.files.items()])
        repo, _, rel = self._find(path.lstrip("/"), "resolve")
        if repo is None:
            return self._missing(path.lstrip("/").partition("/resolve/")[0])
        if rel not in repo.files:
            return self._json(404, {"error": f"{rel} not found"}, {"X-Error-Code": "EntryNotFound"})
        self._file(repo, rel)

    def _file(self, repo: Repo, rel: str) -> None:
        data = repo.files[rel].read_bytes()
        start, end = 0, len(data)
        ranged = self.headers.get("Range", "")
        if ranged.startswith("bytes="):
            first, _, last = ranged[len("bytes="):].partition("-")
            start, end = int(first or 0), min(len(data), int(last) + 1) if last else len(data)
        body = data[start:end]
        self.send_response(206 if ranged else 200)
        self.send_header("Content-Length", str(len(body)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{max(start, end - 1)}/{len(data)}")
        self.send_header("ETag", f'"{repo.etags[rel]}"')
        self.send_header("X-Linked-Etag", f'"{repo.etags[rel]}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Repo-Commit", repo.sha)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if self.command == "HEAD":
            return
        for i in range(0, len(body), CHUNK):
            try:
                self.wfile.write(body[i:i + CHUNK])
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                with self.hub.lock:
                    self.hub.aborted.append(rel)
                return
            if self.hub.bytes_per_s:
                time.sleep(CHUNK / self.hub.bytes_per_s)  # a slow link, so a download can be cancelled mid-way
