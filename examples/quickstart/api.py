"""api.py -- JSON API in front of the store; mesh runs it as 2 replicas.

  GET /products  -> {"replica": <MESH_REPLICA>, "service": ..., "products": [...]}
                    products come from $STORE_URL/items; 502 if the store fails
  GET /healthz   -> 200 "ok"

Environment:
  PORT                        port to listen on (127.0.0.1)
  MESH_SERVICE, MESH_REPLICA  identity given by mesh (reported in responses and logs)
  STORE_URL                   base URL of the store upstream, e.g. http://127.0.0.1:P
"""
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.stdout.reconfigure(line_buffering=True)
PORT = int(os.environ["PORT"])
SERVICE = os.environ.get("MESH_SERVICE", "api")
REPLICA = int(os.environ.get("MESH_REPLICA", "0"))
TAG = f"{SERVICE}[{REPLICA}]"
STORE_URL = os.environ["STORE_URL"].rstrip("/")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, body, ctype="application/json"):
        data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, "ok", "text/plain")
        if self.path != "/products":
            return self.reply(404, {"error": "not found"})
        try:
            with urllib.request.urlopen(f"{STORE_URL}/items", timeout=5) as resp:
                items = json.load(resp)
        except Exception as e:  # connection refused, HTTP error, bad JSON, timeout...
            if isinstance(e, urllib.error.HTTPError):  # keep the body: JSON error or mesh line
                e = f"HTTP {e.code}: {e.read(300).decode(errors='replace').strip()}"
            return self.reply(502, {"replica": REPLICA, "error": f"store unavailable: {e}"})
        self.reply(200, {"replica": REPLICA, "service": SERVICE, "products": items})

    def log_message(self, fmt, *args):
        # mesh's health checks say who they are; a line per real request stays.
        if self.headers and self.headers.get("User-Agent", "").startswith("mesh-health/"):
            return
        print(f"{TAG} {self.address_string()} {fmt % args}", flush=True)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{TAG} listening on 127.0.0.1:{server.server_address[1]} (store at {STORE_URL})", flush=True)
    try:
        server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        print(f"{TAG} shut down", flush=True)


if __name__ == "__main__":
    main()
