"""A local OpenAI-compatible judge server for tests: 127.0.0.1 only, a free port, a thread.

It answers YES when the response under judgment contains "good", else NO, and echoes
the request id. `faults(request_id, attempt)` decides what each attempt gets: "ok",
"slow" (sleeps `slow_s` first), "hang" (sleeps `hang_s`: past the client's timeout),
"error" (HTTP 503), "fatal" (HTTP 500), "malformed" (a body with no verdict), "garbled"
(a verdict that is neither YES nor NO) or "wrong_id" (another request's id).
"""

import collections
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

RESPONSE_RE = re.compile(r"\[Response\]\n(.*)\n\nIs this a good response", re.S)


def verdict_of(completion: str) -> str:
    return "YES" if "good" in completion.split() else "NO"


class JudgeServer:
    def __init__(self, faults=lambda request_id, attempt: "ok", slow_s=0.05, hang_s=1.0):
        self.faults, self.slow_s, self.hang_s = faults, slow_s, hang_s
        self.attempts = collections.Counter()   # request id -> attempts seen
        self.answered = collections.Counter()   # request id -> good answers sent
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                request_id = self.headers["X-Request-Id"]
                with server._lock:
                    attempt = server.attempts[request_id]
                    server.attempts[request_id] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._answer(body, request_id, server.faults(request_id, attempt))
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body, request_id, fault):
                if fault in ("error", "fatal"):
                    self.send_response(503 if fault == "error" else 500)
                    self.end_headers()
                    return
                if fault == "slow":
                    time.sleep(server.slow_s)
                if fault == "hang":
                    time.sleep(server.hang_s)
                completion = RESPONSE_RE.search(body["messages"][-1]["content"]).group(1)
                text, echoed = verdict_of(completion), request_id
                if fault == "garbled":
                    text = "Maybe, hard to say"
                if fault == "wrong_id":
                    echoed = request_id + "x"
                reply = {"choices": [{"message": {"content": text}}], "request_id": echoed}
                raw = b"{not json" if fault == "malformed" else json.dumps(reply).encode()
                if fault == "ok" or fault == "slow":
                    with server._lock:
                        server.answered[request_id] += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                try:
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
