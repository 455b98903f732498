#!/usr/bin/env python3
"""Crash test: kill -9 the production server mid-write, restart it, and check that nothing acknowledged is lost.

    python .ci/crash.py [--rounds 3] [--clients 6] [--cars 20]

Starts `flask --app dealership serve` as the README says (its default workers: one process per
core), on a database file in a temporary folder, with the default durability
(DEALERSHIP_SYNCHRONOUS=full). Each round, --clients clients book, reschedule and cancel as fast as
they can; after a random 1 to 3 seconds the server, its supervisor and every worker at once, gets
SIGKILL, in the middle of their requests. The server is started again on the same file, and everything it holds is checked against
what the clients were told:
- every booking whose 201 was received is there, with the times of the last 200 received for it,
  unless a later 204 removed it;
- a request whose answer never came (cut off by the kill) left either nothing or its whole effect:
  a booking nobody was told about is one of those requests' bodies, exactly;
- no two bookings of one car overlap, and ids go on after the restart (a new booking's id is higher
  than every id seen before);
- each booking and move carries an Idempotency-Key, and each client then retries its cut-off booking
  or move with the same key, as a client whose request timed out would: if the first one was carried
  out, the retry gets its answer again (Idempotent-Replayed, the same booking) and changes nothing;
  if not, the retry is carried out afresh. Either way no booking is made twice.
At least three rounds. Then, with the server running, its database file (and -wal, -shm) is moved
away, as a careless operator would delete it: every write must answer 503 naming the file, /health
503 from every worker, reads the same data as before; moved back, writes work again, and a restart
holds every booking acknowledged and none that was refused. Every request has a timeout and the run a deadline; the server is stopped
however this exits. Nothing is left in the temporary folder unless the check fails: then the
server logs (one per start) are kept and their paths printed.
"""
import argparse
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

from serve import HOST, every_booking, run, start, stop, verdict

API = "/api/v1"
T0 = datetime(2036, 1, 1, tzinfo=timezone.utc)
KINDS = {"book": {201, 409}, "move": {200, 409}, "cancel": {204}}


def call(conn, method, path, body=None, key=None, headers=None):
    """(status, body as JSON); with `headers` (a dict), the response's headers are put in it."""
    data = None if body is None else json.dumps(body)
    sent = ({"Content-Type": "application/json"} if body is not None else {}) | ({"Idempotency-Key": key} if key else {})
    conn.request(method, path, data, sent)
    response = conn.getresponse()
    payload = response.read()
    if headers is not None:
        headers.update(response.getheaders())
    return response.status, (json.loads(payload) if payload else None)


def span(rng):
    start = T0 + timedelta(hours=rng.randrange(0, 3000))
    end = start + timedelta(hours=rng.choice([1, 2, 5, 24]))
    return start.isoformat(), end.isoformat()


class Client(threading.Thread):
    """Books, moves and cancels until its connection breaks (the kill) or the deadline passes.

    `told` holds what the server acknowledged, in order; `cut` the one request whose answer never came.
    """

    def __init__(self, name, port, car_ids, deadline, seed, mine):
        super().__init__(daemon=True)
        self.name, self.port, self.car_ids, self.deadline = name, port, car_ids, deadline
        self.rng = random.Random(seed)
        self.mine = mine  # ids of this client's bookings that exist, carried over rounds
        self.told, self.cut, self.problems, self.serial = [], None, [], 0

    def run(self):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        while time.monotonic() < self.deadline:
            roll = self.rng.random()
            if roll < 0.5 or not self.mine:
                self.serial += 1
                start, end = span(self.rng)
                body = {"car_id": self.rng.choice(self.car_ids), "customer_name": f"{self.name} #{self.serial}",
                        "customer_email": "crash@example.com", "start_datetime": start, "end_datetime": end}
                request = ("book", "POST", f"{API}/bookings", body)
            elif roll < 0.8:
                start, end = span(self.rng)
                booking_id = self.rng.choice(self.mine)
                request = ("move", "PATCH", f"{API}/bookings/{booking_id}", {"start_datetime": start, "end_datetime": end})
            else:
                booking_id = self.mine.pop(self.rng.randrange(len(self.mine)))
                request = ("cancel", "DELETE", f"{API}/bookings/{booking_id}", None)
            kind, method, path, body = request
            key = f"{self.name}-{self.serial}-{len(self.told)}" if kind != "cancel" else None
            request += (key,)
            try:
                status, payload = call(conn, method, path, body, key)
            except (OSError, http.client.HTTPException):
                self.cut = request  # the kill: this request may or may not have been carried out
                if kind == "cancel":
                    self.mine.append(booking_id)
                return
            if status not in KINDS[kind]:
                self.problems.append(f"{method} {path} answered {status}: {payload}")
                return
            self.told.append((kind, status, path, body, payload))
            if kind == "book" and status == 201:
                self.mine.append(payload["id"])


def stored_bookings(base):
    conn = http.client.HTTPConnection(HOST, urlsplit(base).port, timeout=30)
    status, bookings = every_booking(lambda path: call(conn, "GET", path))
    if status != 200:
        sys.exit(f"crash: GET /bookings answered {status}")
    return {b["id"]: b for b in bookings}


def instant(text):
    return datetime.fromisoformat(text)


def same_times(booking, body):
    return (instant(booking["start_datetime"]), instant(booking["end_datetime"])) == \
        (instant(body["start_datetime"]), instant(body["end_datetime"]))


def check(before, clients, after, problems):
    """`before`: the bookings stored when the round began; `after`: those stored after the restart."""
    expected = dict(before)  # id -> booking as the clients were last told
    for client in clients:
        for kind, status, path, body, payload in client.told:
            if kind == "book" and status == 201:
                expected[payload["id"]] = payload
            elif kind == "move" and status == 200:
                expected[payload["id"]] = payload
            elif kind == "cancel":
                expected.pop(int(path.rsplit("/", 1)[1]), None)
    cut = [client.cut[:4] for client in clients if client.cut is not None]
    cut_cancels = {int(path.rsplit("/", 1)[1]) for kind, _, path, _ in cut if kind == "cancel"}
    cut_moves = defaultdict(list)
    for kind, _, path, body in cut:
        if kind == "move":
            cut_moves[int(path.rsplit("/", 1)[1])].append(body)
    cut_books = [body for kind, _, _, body in cut if kind == "book"]

    for booking_id, booking in expected.items():
        stored = after.get(booking_id)
        if stored is None:
            if booking_id not in cut_cancels:
                problems.append(f"booking {booking_id} was acknowledged and is gone")
        elif stored != booking and not any(same_times(stored, body) for body in cut_moves[booking_id]):
            problems.append(f"booking {booking_id} is {stored}, but the clients were told {booking}")
    for booking_id, stored in after.items():
        if booking_id in expected:
            continue
        matches = [body for body in cut_books if body["customer_name"] == stored["customer_name"]]
        if not matches or any(stored[k] != matches[0][k] for k in ("car_id", "customer_email")) \
                or not same_times(stored, matches[0]):
            problems.append(f"booking {booking_id} was never acknowledged and is not a cut-off request: {stored}")
        else:
            cut_books.remove(matches[0])
    by_car = defaultdict(list)
    for b in after.values():
        by_car[b["car_id"]].append((instant(b["start_datetime"]), instant(b["end_datetime"]), b["id"]))
    for car_id, spans in by_car.items():
        spans.sort()
        for (_, end_a, id_a), (start_b, _, id_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                problems.append(f"car {car_id}: bookings {id_a} and {id_b} overlap")
    return sum(len(client.told) for client in clients), len(cut)


def retry_cut(base, clients, stored, problems):
    """Each cut-off booking or move sent again with its Idempotency-Key: the first one's answer if it
    was carried out (`stored` holds what the restart found), else carried out now; never twice."""
    conn = http.client.HTTPConnection(HOST, urlsplit(base).port, timeout=10)
    retried = replayed = 0
    for client in clients:
        if client.cut is None or client.cut[0] == "cancel":
            continue
        kind, method, path, body, key = client.cut
        headers = {}
        status, payload = call(conn, method, path, body, key, headers)
        again = headers.get("Idempotent-Replayed") == "true"
        retried, replayed = retried + 1, replayed + again
        if kind == "book":
            found = [b for b in stored.values() if b["customer_name"] == body["customer_name"]]
            if found and not (status == 201 and again and payload["id"] == found[0]["id"]):
                problems.append(f"{key}: the cut-off booking was stored as {found[0]['id']}, and its retry answered "
                                f"{status} (replayed: {again}): {payload}")
            elif not found and (again or status not in (201, 409)):
                problems.append(f"{key}: the cut-off booking was not stored, and its retry answered {status} "
                                f"(replayed: {again}): {payload}")
            if status == 201 and not found:
                client.mine.append(payload["id"])
        elif status not in (200, 404, 409):
            problems.append(f"{key}: the retried move answered {status}: {payload}")
    conn.close()
    names = defaultdict(int)
    for booking in stored_bookings(base).values():
        names[booking["customer_name"]] += 1
    problems.extend(f"{name} was booked {n} times" for name, n in names.items() if n > 1)
    return retried, replayed


def file_taken_away(base, database, car_ids, problems):
    """The database file moved away under the running server, then back."""
    port = urlsplit(base).port
    before = stored_bookings(base)
    aside = f"{database}.aside"
    os.makedirs(aside)
    moved = [name for name in (database, f"{database}-wal", f"{database}-shm") if os.path.exists(name)]
    for name in moved:
        os.rename(name, os.path.join(aside, os.path.basename(name)))
    refused, health, counts = [], [], set()
    for n in range(20):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)  # a new connection: any worker
        status, body = call(conn, "POST", f"{API}/bookings", {
            "car_id": car_ids[n % len(car_ids)], "customer_name": "while the file was gone",
            "customer_email": "crash@example.com", "start_datetime": (T0 + timedelta(days=500, hours=n)).isoformat(),
            "end_datetime": (T0 + timedelta(days=500, hours=n, minutes=30)).isoformat()})
        refused.append((status, (body or {}).get("detail", "")))
        health.append(call(conn, "GET", "/health")[0])
        counts.add(len(call(conn, "GET", f"{API}/bookings?limit=1000")[1] or []))
        conn.close()
    if os.path.exists(database):
        problems.append("a new database file appeared at the path while it was gone")
    for name in moved:
        os.replace(os.path.join(aside, os.path.basename(name)), name)
    os.rmdir(aside)
    if any(status != 503 or database not in detail for status, detail in refused):
        problems.append(f"with the file gone, writes answered {sorted({s for s, _ in refused})}, not 503 naming it")
    if set(health) != {503}:
        problems.append(f"with the file gone, /health answered {sorted(set(health))}")
    if counts != {min(len(before), 1000)}:
        problems.append(f"with the file gone, the workers answered {sorted(counts)} bookings, not {len(before)}")
    print(f"crash: file moved away: 20 writes answered {sorted({s for s, _ in refused})}, /health "
          f"{sorted(set(health))}, every worker listed {sorted(counts)} bookings; moved back")
    return before


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--cars", type=int, default=20)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if a.rounds < 3:
        sys.exit("crash: at least three kill/restart rounds")
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    print(f"crash: seed {seed}")
    rng = random.Random(seed)
    folder = tempfile.mkdtemp(prefix="dealership-crash-")
    database = f"{folder}/dealership.sqlite3"
    server = None
    problems = []
    try:
        server, base = start(database, threads=8, command="serve")
        conn = http.client.HTTPConnection(HOST, urlsplit(base).port, timeout=10)
        car_ids = []
        for n in range(a.cars):
            status, car = call(conn, "POST", f"{API}/cars", {
                "brand": "Skoda", "model": "Fabia", "year": 2024, "color": "Green", "daily_price": 39.0,
                "vin": f"TMBEA6NJ1L{n:07d}", "dealer_id": 1})
            if status != 201:
                sys.exit(f"crash: filling cars failed with {status}: {car}")
            car_ids.append(car["id"])
        conn.close()
        mine = defaultdict(list)
        for round_ in range(1, a.rounds + 1):
            before = stored_bookings(base)
            deadline = time.monotonic() + 15
            clients = [Client(f"r{round_}c{n}", urlsplit(base).port, car_ids, deadline, rng.random(), mine[n])
                       for n in range(a.clients)]
            for client in clients:
                client.start()
            time.sleep(rng.uniform(1, 3))
            os.killpg(server.pid, signal.SIGKILL)  # the supervisor and every worker at once
            server.wait(timeout=10)
            for client in clients:
                client.join(timeout=20)
            if any(client.is_alive() for client in clients):
                problems.append(f"round {round_}: a client did not stop")
            for client in clients:
                problems.extend(f"round {round_}: {p}" for p in client.problems)
            server, base = start(database, threads=8, command="serve")
            after = stored_bookings(base)
            acknowledged, cut = check(before, clients, after, problems)
            retried, replayed = retry_cut(base, clients, after, problems)
            highest = max([0, *before, *after] + [p["id"] for c in clients for *_, p in c.told if p and "id" in p])
            for ids in mine.values():  # a cut-off cancel may have been carried out, a cut-off booking too
                ids[:] = [booking_id for booking_id in ids if booking_id in after]
            conn = http.client.HTTPConnection(HOST, urlsplit(base).port, timeout=10)
            status, fresh = call(conn, "POST", f"{API}/bookings", {
                "car_id": car_ids[0], "customer_name": f"after round {round_}", "customer_email": "crash@example.com",
                "start_datetime": (T0 + timedelta(days=400 + round_)).isoformat(),
                "end_datetime": (T0 + timedelta(days=400 + round_, hours=1)).isoformat()})
            conn.close()
            if status != 201 or fresh["id"] <= highest:
                problems.append(f"round {round_}: after the restart a new booking got {status} {fresh}; "
                                f"the highest id seen was {highest}")
            print(f"crash: round {round_}: killed after {acknowledged} acknowledged writes with {cut} requests "
                  f"cut off; {len(after)} bookings stored after the restart, the next id {fresh.get('id')}; "
                  f"{retried} cut-off requests retried with their keys, {replayed} of them answered as before")
        before = file_taken_away(base, database, car_ids, problems)
        conn = http.client.HTTPConnection(HOST, urlsplit(base).port, timeout=10)
        status, fresh = call(conn, "POST", f"{API}/bookings", {
            "car_id": car_ids[0], "customer_name": "file back", "customer_email": "crash@example.com",
            "start_datetime": (T0 + timedelta(days=600)).isoformat(),
            "end_datetime": (T0 + timedelta(days=600, hours=1)).isoformat()})
        conn.close()
        if status != 201:
            problems.append(f"with the file back, a new booking answered {status} {fresh}")
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        server, base = start(database, threads=8, command="serve")
        after = stored_bookings(base)
        if status == 201 and set(after) != set(before) | {fresh["id"]}:
            problems.append(f"after the file came back and a restart: {len(after)} bookings, expected "
                            f"{len(before) + 1} (those acknowledged, and none refused)")
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(folder, ignore_errors=True)
    return verdict("crash", problems)


if __name__ == "__main__":
    sys.exit(run(main))
