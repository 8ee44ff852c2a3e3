"""migrate.py -- one-shot job that prepares the shop database.

Creates the `items` table in the SQLite file used by store.py and inserts three
sample products when the table is empty, then exits 0.  Safe to run repeatedly.

Environment:
  STORE_DB       path of the SQLite file (default: data/shop.db next to this script)
  MESH_SERVICE   service name given by mesh (only used in log lines)
"""
import os
import sqlite3
import sys
from pathlib import Path

sys.stdout.reconfigure(line_buffering=True)
NAME = os.environ.get("MESH_SERVICE", "migrate")
DB = Path(os.environ.get("STORE_DB") or Path(__file__).resolve().parent / "data" / "shop.db")
SAMPLES = [
    ("kettle", "Stovetop kettle", 2450),
    ("mug", "Enamel mug", 899),
    ("teapot", "Cast-iron teapot", 3900),
]


def main():
    DB.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(DB) as db:
        db.execute(
            "CREATE TABLE IF NOT EXISTS items ("
            " key TEXT PRIMARY KEY, name TEXT NOT NULL, price_cents INTEGER NOT NULL)"
        )
        print(f"{NAME}: schema ready in {DB}", flush=True)
        (count,) = db.execute("SELECT COUNT(*) FROM items").fetchone()
        if count:
            print(f"{NAME}: table already has {count} item(s), nothing to insert", flush=True)
        else:
            db.executemany("INSERT INTO items VALUES (?, ?, ?)", SAMPLES)
            print(f"{NAME}: inserted {len(SAMPLES)} sample items", flush=True)
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
