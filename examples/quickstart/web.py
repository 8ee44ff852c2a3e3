"""web.py -- HTML front end of the shop (mesh exposes it on a fixed port, 8080).

  GET /         -> HTML page listing products from $API_URL/products and naming the
                   api replica that answered; if the api is down the page shows an
                   error line and the status is 502 (the server keeps running)
  GET /healthz  -> 200 "ok"

Environment:
  PORT                        port to listen on (127.0.0.1)
  MESH_SERVICE, MESH_REPLICA  identity given by mesh (used in the page and logs)
  API_URL                     base URL of the api upstream, e.g. http://127.0.0.1:P
"""
import html
import json
import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.stdout.reconfigure(line_buffering=True)
PORT = int(os.environ["PORT"])
TAG = f"{os.environ.get('MESH_SERVICE', 'web')}[{os.environ.get('MESH_REPLICA', '0')}]"
API_URL = os.environ["API_URL"].rstrip("/")
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>Shop</title></head>
<body><h1>Shop</h1>{body}<p><small>page by {tag}</small></p></body></html>\n"""


def describe(err):
    """One-line error text; for an HTTP error, its body (e.g. the mesh's `mesh: ...` line)."""
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}: {err.read(300).decode(errors='replace').strip()}"
    return str(err)


def render():
    """Return (status, html body) for the product page."""
    try:
        with urllib.request.urlopen(f"{API_URL}/products", timeout=5) as resp:
            data = json.load(resp)
        rows = "".join(
            f"<li>{html.escape(p['name'])} &mdash; ${p['price_cents'] / 100:.2f}</li>"
            for p in data["products"]
        )
        replica = int(data["replica"])
    except Exception as e:  # api down, 5xx, timeout, bad JSON: degrade, don't crash
        return 502, f'<p class="error">Products unavailable: {html.escape(describe(e))}</p>'
    return 200, f"<ul>{rows}</ul><p>Served by api replica {replica}</p>"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, text, ctype):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/healthz":
            return self.reply(200, "ok", "text/plain")
        if self.path != "/":
            return self.reply(404, "not found\n", "text/plain")
        status, body = render()
        self.reply(status, PAGE.format(body=body, tag=html.escape(TAG)), "text/html; charset=utf-8")

    def log_message(self, fmt, *args):
        # mesh's health checks say who they are; a line per real request stays.
        if self.headers and self.headers.get("User-Agent", "").startswith("mesh-health/"):
            return
        print(f"{TAG} {self.address_string()} {fmt % args}", flush=True)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{TAG} listening on 127.0.0.1:{server.server_address[1]} (api at {API_URL})", flush=True)
    try:
        server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        print(f"{TAG} shut down", flush=True)


if __name__ == "__main__":
    main()
