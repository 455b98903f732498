#!/usr/bin/env python3
"""Scale benchmark for the dealership service, in-process through Flask's test client.

Run from the project root with the project's environment active:

    python .ci/bench.py 2>/dev/null                         # 1,000 cars x 50 bookings each, in memory
    python .ci/bench.py --database file 2>/dev/null         # the same on a SQLite file in a temporary folder
    python .ci/bench.py --database postgresql 2>/dev/null   # the same on PostgreSQL (see below)
    python .ci/bench.py --cars 2000 --per-car 100 2>/dev/null

(2>/dev/null drops the service's own log lines, one per change, which create_app writes to stderr.)

It fills a fresh create_app({"DEALERSHIP_DATABASE": ...}) through the public HTTP API only, then times
each request in turn with a "floor", pair by pair over --rounds: a bare Flask app in the same process
whose GET routes return the very same JSON bodies as ready bytes (what a Flask response costs when
there is nothing left to compute or encode), and whose POST echoes the posted body (parse and encode).
The median of the pair ratios is what the targets are written in:

  list     GET /api/v1/cars (every car)                          list/floor      target <= 1.3
  avail    GET /api/v1/bookings/available-cars (half the cars busy) avail/floor  target <= 2.0
  slots    GET /api/v1/bookings/available-slots (each car's earliest slot of 0.9 days from the same instant,
           stepping over a booking for half of them), against avail     slots/avail  target <= 3
  create   POST /api/v1/bookings then DELETE it, on the full store  create/floor  target <= 2.3 (file: 3.5)
  growth   create on the full store / create on an empty store       growth       target <= 1.2
  keyed    create sent with an Idempotency-Key (a new one each time), against create
                                                                     keyed/create target <= 1.1
  if-match PATCH /api/v1/bookings/{id} sent with If-Match (its current ETag), against the same PATCH
           without one                                               if-match/edit target <= 1.1
  feed     GET /api/v1/changes?limit=100 from the newest 100 changes, against the page of the oldest
           100 the log keeps (every change of the fill, made within DEALERSHIP_HISTORY_DAYS): a page
           costs the page, wherever it is                                    feed/oldest target <= 1.2
           (feed/floor is shown beside: the same body as ready bytes)
  memory   resident bytes added per stored booking                   bytes/booking target <= 1,000
  reopen   seconds for create_app() on the filled file (file only)   reopen s     target <= 2

--database takes ":memory:" (the default), "file" (a new file in a temporary folder, removed after), a
path to a file that does not exist yet, or "postgresql": two new databases (the store, and the empty one
of growth), dropped after, on the server of DEALERSHIP_TEST_DATABASE_URL, a superuser's URL such as
postgresql://postgres@/postgres?host=/run/postgresql. A service without DEALERSHIP_DATABASE ignores the setting.

Absolute times on a shared machine are noise; the ratios are measured side by side in one run.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from flask import Flask, Response, request

sys.path.insert(0, os.getcwd())
from dealership import create_app  # noqa: E402

T0 = datetime(2035, 1, 1, tzinfo=timezone.utc)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def q(d):
    return d.isoformat().replace("+", "%2B")


def must(r, code):
    if r.status_code != code:
        sys.exit(f"bench: expected {code}, got {r.status_code}: {r.get_data(as_text=True)[:300]}")
    return r


def paired(fn, floor_fn, n):
    """Time fn and floor_fn in turn, n pairs after a warm-up: (median ms, floor median ms, median of pair ratios)."""
    for _ in range(3):
        fn()
        floor_fn()
    ours, base, ratios = [], [], []
    for _ in range(n):
        a = time.perf_counter()
        fn()
        b = time.perf_counter()
        floor_fn()
        c = time.perf_counter()
        ours.append(b - a)
        base.append(c - b)
        ratios.append((b - a) / (c - b))
    return statistics.median(ours) * 1000, statistics.median(base) * 1000, statistics.median(ratios)


def booking(car_id, start, hours):
    return {"car_id": car_id, "customer_name": "Bench Customer", "customer_email": "bench@example.com",
            "start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=hours)).isoformat()}


def fill(client, cars, per_car):
    ids = []
    for i in range(cars):
        r = must(client.post("/api/v1/cars", json={"brand": "Toyota", "model": "Camry", "year": 2023, "color": "Blue",
                                                   "daily_price": 100.0, "vin": f"1HGBH41JXM{i:07d}", "dealer_id": 1}), 201)
        ids.append(r.get_json()["id"])
    # every car: a 2-day booking every 3 days; odd cars shifted by 1.5 days
    for k in range(per_car):
        for n, cid in enumerate(ids):
            must(client.post("/api/v1/bookings", json=booking(cid, T0 + timedelta(days=3 * k + (1.5 if n % 2 else 0)), 48)), 201)
    return ids


def floor_client(bodies):
    """A bare Flask app: GET returns the body as ready bytes, POST echoes, DELETE answers 204."""
    floor = Flask("floor")
    ready = {name: json.dumps(body, separators=(",", ":")).encode() for name, body in bodies.items()}

    @floor.get("/<name>")
    def fixed(name):
        return Response(ready[name], mimetype="application/json")

    @floor.post("/echo")
    def echo():
        return request.get_json(), 201

    @floor.delete("/echo")
    def gone():
        return "", 204
    return floor.test_client()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cars", type=int, default=1000)
    ap.add_argument("--per-car", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--database", default=":memory:", help='":memory:", "file", "postgresql", or a new file\'s path')
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the folder is still removed
    scratch = tempfile.mkdtemp(prefix="dealership-bench-")
    databases = []
    try:
        return run(a, scratch, databases)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        for name in databases:
            with postgres_admin() as admin:
                admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def postgres_admin():
    import psycopg

    url = os.environ.get("DEALERSHIP_TEST_DATABASE_URL")
    if not url:
        sys.exit("bench: --database postgresql needs DEALERSHIP_TEST_DATABASE_URL, a superuser's URL")
    return psycopg.connect(url, autocommit=True)


def new_postgres_database(name, databases):
    """A new database on the server of DEALERSHIP_TEST_DATABASE_URL, and its URL."""
    from urllib.parse import urlsplit, urlunsplit

    with postgres_admin() as admin:
        admin.execute(f"CREATE DATABASE {name}")
    databases.append(name)
    parts = urlsplit(os.environ["DEALERSHIP_TEST_DATABASE_URL"])
    return urlunsplit(parts._replace(path=f"/{name}"))


def run(a, scratch, databases):
    on_file = a.database != ":memory:"
    database = os.path.join(scratch, "bench.sqlite3") if a.database == "file" else a.database
    if a.database == "postgresql":
        database = new_postgres_database(f"dealership_bench_{os.getpid()}", databases)
    elif on_file and os.path.exists(database):
        sys.exit(f"bench: {database} exists already; give a new path")

    def app(path):
        return create_app({"DEALERSHIP_DATABASE": path})

    client = app(database).test_client()
    before = rss_bytes()
    t = time.perf_counter()
    ids = fill(client, a.cars, a.per_car)
    fill_s = time.perf_counter() - t
    bookings = a.cars * a.per_car
    per_booking = (rss_bytes() - before) / max(bookings, 1)

    # even cars are busy over [3k, 3k+2) days, odd cars over [3k+1.5, 3k+3.5): this window finds the odd ones busy
    mid = T0 + timedelta(days=3 * (a.per_car // 2) + 2.05)
    avail_url = f"/api/v1/bookings/available-cars?start_datetime={q(mid)}&end_datetime={q(mid + timedelta(days=0.9))}"
    slots_url = f"/api/v1/bookings/available-slots?duration=PT21H36M&after={q(mid)}"
    bodies = {"list": must(client.get("/api/v1/cars"), 200).get_json(), "avail": must(client.get(avail_url), 200).get_json()}
    slots_found = len(must(client.get(slots_url), 200).get_json())
    probe = booking(ids[0], T0, 1)

    def floor_create():
        must(floor.post("/echo", json=probe), 201)
        must(floor.delete("/echo"), 204)

    if a.database == "postgresql":
        empty_database = new_postgres_database(f"dealership_bench_{os.getpid()}_empty", databases)
    else:
        empty_database = os.path.join(scratch, "empty.sqlite3") if on_file else ":memory:"
    empty = app(empty_database).test_client()
    empty_car = fill(empty, 1, 0)[0]
    far = booking(ids[0], T0 + timedelta(days=365 * 50), 1)
    far_empty = dict(far, car_id=empty_car)

    def create(c, body, keyed=False):
        def once():
            headers = {"Idempotency-Key": f"bench-{next(keys)}"} if keyed else {}
            r = must(c.post("/api/v1/bookings", json=body, headers=headers), 201)
            must(c.delete(f"/api/v1/bookings/{r.get_json()['id']}"), 204)
        return once
    keys = iter(range(10**9))

    edited = must(client.post("/api/v1/bookings", json=booking(ids[1], T0 + timedelta(days=365 * 60), 1)), 201)
    edit_url, tag, names = edited.headers["Location"], [edited.headers["ETag"]], iter(range(10**9))

    def edit(conditional):
        def once():
            headers = {"If-Match": tag[0]} if conditional else {}
            r = must(client.patch(edit_url, json={"customer_name": f"Bench {next(names)}"}, headers=headers), 200)
            tag[0] = r.headers["ETag"]
        return once

    pages, since = [], None  # the cursors of the log, to read its newest 100 changes as one page
    while True:
        page = must(client.get("/api/v1/changes", query_string={"limit": 1000} | ({"since": since} if since else {})),
                    200).get_json()
        if not page["changes"]:
            break
        pages += [change["cursor"] for change in page["changes"]]
        since = page["next"]
    newest_url = f"/api/v1/changes?limit=100&since={pages[-101]}"
    oldest_url = "/api/v1/changes?limit=100"
    bodies["feed"] = must(client.get(newest_url), 200).get_json()
    floor = floor_client(bodies)

    rows = {
        "list": paired(lambda: client.get("/api/v1/cars"), lambda: floor.get("/list"), a.rounds),
        "avail": paired(lambda: client.get(avail_url), lambda: floor.get("/avail"), a.rounds),
        "slots": paired(lambda: client.get(slots_url), lambda: client.get(avail_url), a.rounds),
        "create": paired(create(client, far), floor_create, a.rounds),
        "growth": paired(create(client, far), create(empty, far_empty), a.rounds),
        "keyed": paired(create(client, far, keyed=True), create(client, far), a.rounds),
        "if-match": paired(edit(True), edit(False), a.rounds),
        "feed": paired(lambda: client.get(newest_url), lambda: client.get(oldest_url), a.rounds),
        "feed/floor": paired(lambda: client.get(newest_url), lambda: floor.get("/feed"), a.rounds),
    }
    reopen_s = None
    if on_file:
        t = time.perf_counter()
        again = app(database).test_client()
        reopen_s = time.perf_counter() - t
        seen = must(again.get(avail_url), 200).get_json()
        if seen != bodies["avail"]:
            sys.exit("bench: the reopened store answers available-cars differently")
    print(f"store: {a.cars} cars, {bookings} bookings, database {a.database}, "
          f"filled in {fill_s:.1f} s ({bookings / fill_s:.0f} bookings/s)")
    print(f"{'request':8} {'service ms':>11} {'base ms':>9} {'ratio':>6}   (base: the bare Flask floor; for growth, the empty store)")
    for name, (ours, base, ratio) in rows.items():
        print(f"{name:8} {ours:11.3f} {base:9.3f} {ratio:6.2f}")
    print(f"  (list: {len(bodies['list'])} cars; avail: {len(bodies['avail'])} cars free in the window; "
          f"slots: {slots_found}; base of slots: avail; of keyed: create; of if-match: the PATCH without it; "
          f"of feed: the oldest page of {len(pages)} changes kept)")
    figures = {"list/floor": (rows["list"][2], 1.3),
               "avail/floor": (rows["avail"][2], 2.0),
               "slots/avail": (rows["slots"][2], 3.0),
               "create/floor": (rows["create"][2], 3.5 if on_file else 2.3),
               "growth": (rows["growth"][2], 1.2),
               "keyed/create": (rows["keyed"][2], 1.1),
               "if-match/edit": (rows["if-match"][2], 1.1),
               "feed/oldest": (rows["feed"][2], 1.2),
               "bytes/booking": (per_booking, 1000)}
    if reopen_s is not None:
        figures["reopen s"] = (reopen_s, 2.0)
    missed = [name for name, (value, target) in figures.items() if value > target]
    print("ratios: " + ", ".join(f"{name} {value:.2f} (<= {target:g})" if value < 100 else f"{name} {value:.0f} (<= {target:g})"
                                 for name, (value, target) in figures.items()))
    print("bench: every target met" if not missed else "bench: missed " + ", ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
