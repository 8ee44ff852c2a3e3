"""store.py -- tiny key-value store over HTTP, backed by SQLite.

  GET /items        -> JSON list of {"key", "name", "price_cents"}
  GET /items/<key>  -> one item as JSON, or 404
  GET /healthz      -> 200 "ok" once migrate.py has created the schema, else 503

Environment:
  PORT                        port to listen on (127.0.0.1)
  MESH_SERVICE, MESH_REPLICA  identity given by mesh (used in log lines)
  STORE_DB                    path of the SQLite file (default: data/shop.db next to this script)
"""
import json
import os
import signal
import sqlite3
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.stdout.reconfigure(line_buffering=True)
PORT = int(os.environ["PORT"])
TAG = f"{os.environ.get('MESH_SERVICE', 'store')}[{os.environ.get('MESH_REPLICA', '0')}]"
DB = Path(os.environ.get("STORE_DB") or Path(__file__).resolve().parent / "data" / "shop.db")


def query(sql, *args):
    # One short-lived connection per request (thread-safe); mode=rw never creates the file.
    db = sqlite3.connect(DB.resolve().as_uri() + "?mode=rw", uri=True)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


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
        try:
            if self.path == "/healthz":
                ready = query("SELECT 1 FROM sqlite_master WHERE name = 'items'")
                return self.reply(200 if ready else 503, "ok" if ready else "no schema", "text/plain")
            if self.path == "/items":
                rows = query("SELECT key, name, price_cents FROM items ORDER BY key")
                return self.reply(200, [dict(zip(("key", "name", "price_cents"), r)) for r in rows])
            if self.path.startswith("/items/"):
                rows = query("SELECT key, name, price_cents FROM items WHERE key = ?", self.path[7:])
                if rows:
                    return self.reply(200, dict(zip(("key", "name", "price_cents"), rows[0])))
                return self.reply(404, {"error": "no such item"})
        except sqlite3.Error as e:
            return self.reply(503, {"error": f"database not ready: {e}"})
        self.reply(404, {"error": "not found"})

    def log_message(self, fmt, *args):
        # mesh's health checks say who they are; a line per real request stays.
        if self.headers and self.headers.get("User-Agent", "").startswith("mesh-health/"):
            return
        print(f"{TAG} {self.address_string()} {fmt % args}", flush=True)


def main():
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{TAG} listening on 127.0.0.1:{server.server_address[1]} (db {DB})", flush=True)
    try:
        server.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
        print(f"{TAG} shut down", flush=True)


if __name__ == "__main__":
    main()
