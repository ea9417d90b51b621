"""A real HTTP server for TUF metadata in tests: `/tuf/metadata/{file}` from a directory, on 127.0.0.1 port 0.

Attack tests swap what a URL serves without touching the repository on disk: `serve(name, data)` overrides one
file, `hide(name)` makes it a 404 (a file the repository never published, or one an attacker withholds), `reset()`
goes back to the directory. Every request path is logged in `requests`.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PREFIX = "/tuf/metadata/"


class TufMetadataServer:
    def __init__(self, metadata_dir: Path) -> None:
        self.metadata_dir = Path(metadata_dir)
        self.overrides: dict[str, bytes | None] = {}
        self.requests: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests.append(self.path)
                    body = server._lookup(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}{PREFIX}"

    def _lookup(self, path: str) -> bytes | None:
        if not path.startswith(PREFIX):
            return None
        name = path[len(PREFIX):]
        if "/" in name or name.startswith("."):
            return None
        if name in self.overrides:
            return self.overrides[name]  # None: hidden, a 404
        file = self.metadata_dir / name
        return file.read_bytes() if file.is_file() else None

    def serve(self, name: str, data: bytes) -> None:
        with self._lock:
            self.overrides[name] = data

    def hide(self, name: str) -> None:
        with self._lock:
            self.overrides[name] = None

    def reset(self) -> None:
        with self._lock:
            self.overrides.clear()

    def start(self) -> TufMetadataServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
