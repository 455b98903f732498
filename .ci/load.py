#!/usr/bin/env python3
"""Load test: the production server under concurrent clients, on 127.0.0.1 only.

    python .ci/load.py [--workers N] [--processes 1] [--clients 32] [--seconds 20] [--cars 200]

Starts `flask --app dealership serve` as the README says (its default workers: one process per core,
each with several threads, on one port and one database file; --processes starts that many such
servers, each on its own port, on the same file); fills --cars cars through the first, then runs
--clients concurrent clients spread over every process for --seconds, mixing
available-cars, GET /cars/{id}, new bookings (a third of them contending for a few hot car-and-range
slots) and cancellations of bookings the client made. It fails unless there was no 5xx, no
unexpected status and no connection error; every booking the clients were told was created (and did
not cancel) is stored, no cancelled one is; no two stored bookings of one car overlap; and the
servers still answer /health and every process answers the same cars and bookings (asked over several
new connections, which the workers of one server take in turn). It prints requests
per second and p50/p99 latency per request kind.
Every request has a timeout, the run has a deadline, and the server is stopped however this exits.
Nothing is left in the temporary folder unless the check fails: then the server log is kept and its
path printed.
"""
import argparse
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from serve import HOST, every_booking, run, serve, verdict

API = "/api/v1"
T0 = datetime(2036, 1, 1, tzinfo=timezone.utc)
EXPECTED = {"avail": {200}, "car": {200}, "book": {201, 409}, "hot": {201, 409}, "cancel": {204}}


class Client:
    """One keep-alive connection; reconnects (and counts an error) if the connection drops."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=10)

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.conn.request(method, path, data, headers)
            response = self.conn.getresponse()
            payload = response.read()
            return response.status, (json.loads(payload) if payload else None)
        except (OSError, http.client.HTTPException) as error:
            self.conn.close()
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            return None, repr(error)


def interval(slot, hours=2):
    start = T0 + timedelta(hours=slot)
    return start.isoformat(), (start + timedelta(hours=hours)).isoformat()


def run_client(port, car_ids, hot, deadline, seed, record):
    rng = random.Random(seed)
    client = Client(port)
    mine = []  # booking ids this client made and has not cancelled
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.25:
            kind = "avail"
            start, end = interval(rng.randrange(0, 2000))
            path = f"{API}/bookings/available-cars?start_datetime={start.replace('+', '%2B')}&end_datetime={end.replace('+', '%2B')}"
            method, body = "GET", None
        elif roll < 0.5:
            kind, method, body = "car", "GET", None
            path = f"{API}/cars/{rng.choice(car_ids)}"
        elif roll < 0.85:
            kind = "hot" if rng.random() < 1 / 3 else "book"
            car_id, slot = rng.choice(hot) if kind == "hot" else (rng.choice(car_ids), rng.randrange(0, 2000))
            start, end = interval(slot, rng.choice([1, 2, 3]))
            method, path = "POST", f"{API}/bookings"
            body = {"car_id": car_id, "customer_name": "Load Client", "customer_email": "load@example.com",
                    "start_datetime": start, "end_datetime": end}
        elif mine:
            kind, method, body = "cancel", "DELETE", None
            path = f"{API}/bookings/{mine.pop(rng.randrange(len(mine)))}"
        else:
            continue
        began = time.perf_counter()
        status, payload = client.call(method, path, body)
        record(kind, time.perf_counter() - began, status, payload, path)
        if status == 201:
            mine.append(payload["id"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--cars", type=int, default=200)
    ap.add_argument("--threads", type=int, default=8, help="threads per worker process")
    ap.add_argument("--workers", type=int, default=None, help="serve's --workers (default: its own, one per core)")
    ap.add_argument("--processes", type=int, default=1, help="servers, each on its own port, on one database file")
    a = ap.parse_args()

    with serve(threads=a.threads, processes=a.processes, command="serve", workers=a.workers) as servers:
        return drive([urlsplit(base).port for base, _ in servers], [server for _, server in servers], a)


def drive(ports, servers, a):
    setup = Client(ports[0])
    car_ids = []
    for n in range(a.cars):
        status, car = setup.call("POST", f"{API}/cars", {
            "brand": "Toyota", "model": "Yaris", "year": 2024, "color": "Red", "daily_price": 45.5,
            "vin": f"VNKKTUD30FA{n:06d}", "dealer_id": 1})
        if status != 201:
            sys.exit(f"load: filling cars failed with {status}: {car}")
        car_ids.append(car["id"])
    hot = [(car_ids[i], 5000 + 4 * i) for i in range(5)]  # five slots that every client fights over

    lock = threading.Lock()
    latencies = defaultdict(list)
    statuses = defaultdict(lambda: defaultdict(int))
    created, cancelled, problems = {}, set(), []

    def record(kind, seconds, status, payload, path):
        with lock:
            latencies[kind].append(seconds)
            statuses[kind][status] += 1
            if status is None:
                problems.append(f"connection error on {kind} {path}: {payload}")
            elif status >= 500 or status not in EXPECTED[kind]:
                problems.append(f"unexpected {status} on {kind} {path}: {payload}")
            elif status == 201:
                created[payload["id"]] = payload
            elif kind == "cancel":
                cancelled.add(int(path.rsplit("/", 1)[1]))

    began = time.monotonic()
    deadline = began + a.seconds
    threads = [threading.Thread(target=run_client, args=(ports[seed % len(ports)], car_ids, hot, deadline, seed, record),
                                daemon=True) for seed in range(a.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=a.seconds + 30)
    elapsed = time.monotonic() - began
    if any(thread.is_alive() for thread in threads):
        problems.append("a client did not finish in time")

    total = sum(len(v) for v in latencies.values())
    print(f"load: {a.clients} clients, {elapsed:.1f} s, {total} requests, {total / elapsed:.0f} requests/s "
          f"(serve, {len(ports)} server(s) of {a.workers or os.cpu_count()} workers of {a.threads} threads on one "
          f"database file, {os.cpu_count()} cores)")
    print(f"{'kind':8} {'count':>7} {'p50 ms':>8} {'p99 ms':>8}   statuses")
    for kind in EXPECTED:
        times = sorted(latencies[kind])
        if not times:
            continue
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(statuses[kind].items(), key=str))
        print(f"{kind:8} {len(times):7d} {statistics.median(times) * 1000:8.2f} {p99 * 1000:8.2f}   {codes}")

    # what is stored must be what the clients were told, and no car may be double-booked
    status, stored = every_booking(lambda path: setup.call("GET", path))
    if status != 200:
        problems.append(f"GET /bookings answered {status}")
        stored = []
    stored_by_id = {b["id"]: b for b in stored}
    kept = {i: b for i, b in created.items() if i not in cancelled}
    missing = [i for i in kept if stored_by_id.get(i) != kept[i]]
    ghosts = [i for i in stored_by_id if i in cancelled or i not in created]
    if missing:
        problems.append(f"{len(missing)} bookings reported created are missing or changed, e.g. {missing[:5]}")
    if ghosts:
        problems.append(f"{len(ghosts)} stored bookings were cancelled or never reported, e.g. {ghosts[:5]}")
    by_car = defaultdict(list)
    for b in stored:
        by_car[b["car_id"]].append((datetime.fromisoformat(b["start_datetime"]), datetime.fromisoformat(b["end_datetime"]), b["id"]))
    for car_id, spans in by_car.items():
        spans.sort()
        for (_, end_a, id_a), (start_b, _, id_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                problems.append(f"car {car_id}: bookings {id_a} and {id_b} overlap")
    print(f"load: {len(stored)} bookings stored, {len(created)} created, {len(cancelled)} cancelled, "
          f"{statuses['hot'][409] + statuses['book'][409]} refused with 409")
    for port, server in [(port, server) for port, server in zip(ports, servers) for _ in range(4)]:
        reader = Client(port)  # a new connection: a worker of this server, maybe another than last time
        for path, (status, seen), expected in [
                (f"{API}/bookings", every_booking(lambda path: reader.call("GET", path)), stored),
                (f"{API}/cars", reader.call("GET", f"{API}/cars"), setup.call("GET", f"{API}/cars")[1])]:
            if status != 200 or seen != expected:
                problems.append(f"the process on port {port} answers {path} differently from the first ({status})")
        health, _ = reader.call("GET", "/health")
        if health != 200:
            problems.append(f"/health on port {port} answered {health} at the end")
        if server.poll() is not None:
            problems.append(f"the server on port {port} exited with {server.returncode}")

    return verdict("load", problems)


if __name__ == "__main__":
    sys.exit(run(main))
