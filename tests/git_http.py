"""A real Git server over HTTP for tests: Git's own `git http-backend` (the CGI program behind most self-hosted Git
HTTP servers) behind a loopback HTTP server that asks for Basic credentials, as a hosted Git service does."""
from __future__ import annotations

import base64
import http.server
import os
import subprocess
import threading
from pathlib import Path


class GitHttpServer:
    """Serves every bare repository under `root` at http://127.0.0.1:<port>/<name>.git to `user`:`token` only;
    `seen` holds each request's Authorization header (None when absent); `on_request`, if given, is called before
    each request is answered (to look at the client's disk while it waits)."""

    def __init__(self, root: Path, user: str, token: str, on_request=None):
        self.seen: list[str | None] = []
        expected = "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()
        seen = self.seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                said = self.headers.get("Authorization")
                seen.append(said)
                if on_request is not None:
                    on_request()
                if said != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, _, query = self.path.partition("?")
                env = {"PATH": os.environ["PATH"], "GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1",
                       "REQUEST_METHOD": self.command, "PATH_INFO": path, "QUERY_STRING": query,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "REMOTE_USER": user,
                       "REMOTE_ADDR": "127.0.0.1", "HTTP_CONTENT_ENCODING": self.headers.get("Content-Encoding", ""),
                       "GIT_PROTOCOL": self.headers.get("Git-Protocol", "")}
                body = self.read_body()
                env["CONTENT_LENGTH"] = str(len(body))
                out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                headers = [line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line]
                status = next((int(v.split()[0]) for k, v in headers if k.lower() == "status"), 200)
                self.send_response(status)
                for key, value in headers:
                    if key.lower() != "status":
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_POST = do_GET

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
