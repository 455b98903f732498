#!/usr/bin/env python3
"""Two machines on one PostgreSQL database, and PostgreSQL going away under them.

    DEALERSHIP_TEST_DATABASE_URL='postgresql://postgres@/postgres?host=/run/pg' \\
    DEALERSHIP_TEST_PGDATA=/srv/pg/data \\
    DEALERSHIP_TEST_PGCTL_OPTIONS="-k /run/pg -c listen_addresses=''" \\
    DEALERSHIP_TEST_PGLOG=/srv/pg/log \\
    python .ci/two_machines.py [--seconds 12] [--clients 16] [--down 3] [--no-fault] [--seed N]

The environment names a running PostgreSQL cluster that this check may use and restart:
- DEALERSHIP_TEST_DATABASE_URL (required): a postgresql:// URL of a superuser. The check creates a
  database of its own on that server (two_machines_<pid>) and drops it at the end (WITH (FORCE),
  once its servers are stopped); nothing else on the server is touched.
- DEALERSHIP_TEST_PGDATA (required for part 2): the cluster's data folder, for pg_ctl. pg_ctl is the
  one of the cluster's version (/usr/lib/postgresql/<PG_VERSION>/bin), else `pg_config --bindir`'s;
  run as the owner of the data folder (through runuser) when this check runs as root.
- DEALERSHIP_TEST_PGCTL_OPTIONS (optional): the server options the cluster runs with, one string as
  `pg_ctl start -o` takes it. Left out: those recorded in PGDATA/postmaster.opts (as pg_ctl restart
  would use them).
- DEALERSHIP_TEST_PGLOG (optional): the server log for the restart (`pg_ctl start -l`); left out:
  two_machines.log in the data folder.

1. Two machines: two `flask --app dealership serve --workers 2` on their own loopback ports, sharing
   nothing but the database. --clients clients, spread over both, book for --seconds: most fight
   over four hot car-and-time slots, others book cars of their own, and some read. Some seconds in,
   one instance (its supervisor and workers, the whole process group) gets SIGKILL, and is started
   again on the same port while the load goes on. Then: every booking acknowledged with 201 is in
   the database (read with psycopg) and in the listings of both instances, as it was acknowledged;
   a stored booking nobody was told about is one whose request was cut off by the kill; no two
   bookings of one car overlap (in SQL and in the API's listings); both instances, asked over several
   new connections (so both workers of each), answer the same cars and bookings as the database; and
   the change feed, read whole through each instance, is the same through both, each cursor once and
   in order, and rebuilds exactly the bookings the database holds.
2. Fault run (both instances, each with three writers, two readers and a /health prober, all on
   new connections so that every worker is reached): PostgreSQL is stopped with
   `pg_ctl stop -m immediate` under that load, kept down --down seconds, and started again with its
   options. While it is down, each instance must answer, before PostgreSQL is started again: writes
   with 503 (problem+json, Retry-After), reads of cars and bookings with 200 from memory (none of
   those begun then taking over 2 s), /health with 503. Once it is back, with no restart of the
   service, each instance's writes succeed again and /health answers 200 with a "pool" object
   within 15 s, then for 3 s nothing is refused; no request goes unanswered.
   Then, with no load, 40 refused writes (409: each took a transaction id and rolled back) that every
   worker has caught up past, an immediate stop and a start: the booking each instance then
   acknowledges must be listed by every worker (PostgreSQL may hand those transaction ids out again
   after a crash). At the end every booking acknowledged before, during and after is stored, none
   refused with "nothing was changed" is, none overlap, and both instances answer what the database
   holds.

Every request has a timeout, every loop a bound in count and time. Every server started is stopped
however this ends (an error, SIGTERM, Ctrl+C), and a PostgreSQL it stopped is started again. The
server logs are kept, and their paths printed, only if the check fails.
"""
import argparse
import contextlib
import glob
import http.client
import json
import os
import pwd
import random
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from serve import HOST, ROOT, SCRATCH, every_booking, free_port, new_log, run, stop, verdict, wait_for

API = "/api/v1"
T0 = datetime(2036, 1, 1, tzinfo=timezone.utc)
EMAIL = "two.machines@example.com"
MAX_REQUESTS = 20_000  # per client thread, whatever the clock says
RECOVERY_BOUND = 15.0  # seconds after PostgreSQL is back within which writes must succeed again
READ_BOUND = 2.0  # seconds: a read while PostgreSQL is down is answered from memory, far sooner than this
UNKNOWN_OUTCOME = "may or may not have been made"  # the 503 of a connection lost during COMMIT


def say(text):
    print(f"two_machines: {text}", flush=True)


# -- HTTP ----------------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int | None  # None: no answer (refused, reset, timed out)
    headers: dict = field(default_factory=dict)  # lower-case names
    payload: object = None
    error: str = ""
    refused: bool = False  # the connection was refused: the request never reached a server


class Client:
    """HTTP/1.1 to one port; keeps its connection unless `fresh`, then a new one per request (which
    the workers of a server take in turn)."""

    def __init__(self, port, fresh=False, timeout=10):
        self.port, self.fresh, self.timeout, self.conn = port, fresh, timeout, None

    def call(self, method, path, body=None):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
        data = None if body is None else json.dumps(body)
        try:
            self.conn.request(method, path, data, {"Content-Type": "application/json"} if body is not None else {})
            response = self.conn.getresponse()
            raw = response.read()
            headers = {name.lower(): value for name, value in response.getheaders()}
            answer = Answer(response.status, headers, json.loads(raw) if raw else None)
        except (OSError, http.client.HTTPException, ValueError) as error:
            self.close()
            return Answer(None, error=repr(error), refused=isinstance(error, ConnectionRefusedError))
        if self.fresh:
            self.close()
        return answer

    def get(self, path):
        """(status, JSON) of a GET, as serve.every_booking takes it."""
        answer = self.call("GET", path)
        return answer.status, answer.payload

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def describe(answer):
    if answer.status is None:
        return f"no answer: {answer.error}"
    detail = answer.payload.get("detail") if isinstance(answer.payload, dict) else answer.payload
    return f"{answer.status}: {detail}"


def booking_body(name, car_id, start, hours):
    return {"car_id": car_id, "customer_name": name, "customer_email": EMAIL,
            "start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=hours)).isoformat()}


class Ledger:
    """Every request of every client: what was sent, when, and what came back."""

    def __init__(self):
        self.lock, self.entries = threading.Lock(), []

    def call(self, client, part, kind, method, path, body=None):
        began = time.monotonic()
        answer = client.call(method, path, body)
        entry = {"part": part, "kind": kind, "port": client.port, "method": method, "path": path, "body": body,
                 "began": began, "ended": time.monotonic(), "answer": answer}
        with self.lock:
            self.entries.append(entry)
        return answer

    def of(self, part=None, kind=None):
        with self.lock:
            return [e for e in self.entries
                    if (part is None or e["part"] == part) and (kind is None or e["kind"] == kind)]


def is_write(entry):
    return entry["method"] == "POST"


# -- the servers -----------------------------------------------------------------------------------


class Instance:
    """One `flask --app dealership serve` (a supervisor and its workers, in a session of their own) on a
    port of its own, the same after a restart: one machine of the two."""

    def __init__(self, name, database_url, workers, threads):
        self.name, self.port, self.process = name, free_port(), None
        self.argv = [sys.executable, "-m", "flask", "--app", "dealership", "serve", "--host", HOST,
                     "--port", str(self.port), "--workers", str(workers), "--threads", str(threads)]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {
            "DEALERSHIP_DATABASE": database_url, "DEALERSHIP_POOL_SIZE": str(threads), "TMPDIR": SCRATCH}

    @property
    def base(self):
        return f"http://{HOST}:{self.port}"

    def start(self):
        log = new_log(f"dealership-{self.name}-")
        with log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(f"{self.base}/health", self.process, seconds=60)  # exits with a message if it does not

    def kill(self):
        """kill -9 of the supervisor and every worker at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self):
        """SIGTERM (the supervisor stops its workers), then SIGKILL to whatever of the group is left."""
        if self.process is None:
            return
        stop(self.process)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None


# -- PostgreSQL ------------------------------------------------------------------------------------


def database_url(admin_url, name):
    """The admin URL with another database name."""
    return urlsplit(admin_url)._replace(path=f"/{name}").geturl()


def admin(admin_url, statement):
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(statement)


def stored(url):
    """(bookings by id, car ids) as the database holds them, and the pairs of overlapping bookings of
    one car, by SQL."""
    with psycopg.connect(url, connect_timeout=10) as conn:
        bookings = {row[0]: row for row in conn.execute(
            "SELECT id, car_id, customer_name, customer_email, start_datetime, end_datetime FROM bookings")}
        cars = [row[0] for row in conn.execute("SELECT id FROM cars ORDER BY id")]
        overlaps = conn.execute(
            "SELECT a.car_id, a.id, b.id FROM bookings a JOIN bookings b ON a.car_id = b.car_id AND a.id < b.id "
            "AND tstzrange(a.start_datetime, a.end_datetime) && tstzrange(b.start_datetime, b.end_datetime) "
            "LIMIT 20").fetchall()
    return bookings, cars, overlaps


class Cluster:
    """The PostgreSQL cluster of DEALERSHIP_TEST_PGDATA, stopped and started with its own pg_ctl."""

    def __init__(self):
        self.pgdata = os.environ.get("DEALERSHIP_TEST_PGDATA")
        if not self.pgdata or not os.path.isdir(self.pgdata):
            sys.exit("two_machines: DEALERSHIP_TEST_PGDATA must name the cluster's data folder for the fault run "
                     "(or pass --no-fault)")
        self.pg_ctl = self._find_pg_ctl()
        self.owner = pwd.getpwuid(os.stat(self.pgdata).st_uid).pw_name
        options = os.environ.get("DEALERSHIP_TEST_PGCTL_OPTIONS")
        self.options = options if options is not None else self._recorded_options()
        self.log = os.environ.get("DEALERSHIP_TEST_PGLOG") or os.path.join(self.pgdata, "two_machines.log")
        self.down = False  # stopped by this check and not started again yet

    def _find_pg_ctl(self):
        with contextlib.suppress(OSError):
            with open(os.path.join(self.pgdata, "PG_VERSION")) as f:
                candidate = f"/usr/lib/postgresql/{f.read().strip()}/bin/pg_ctl"
            if os.access(candidate, os.X_OK):
                return candidate
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
            if bindir and os.access(os.path.join(bindir, "pg_ctl"), os.X_OK):
                return os.path.join(bindir, "pg_ctl")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            sys.exit("two_machines: no pg_ctl found (pg_config --bindir, /usr/lib/postgresql/*/bin)")
        return found[-1]

    def _recorded_options(self):
        """The options of postmaster.opts (the postgres command line the cluster was started with), less
        the program and its -D."""
        try:
            with open(os.path.join(self.pgdata, "postmaster.opts")) as f:
                words = shlex.split(f.read())[1:]
        except OSError as error:
            sys.exit(f"two_machines: set DEALERSHIP_TEST_PGCTL_OPTIONS: {error}")
        options = []
        while words:
            word = words.pop(0)
            if word == "-D" and words:
                words.pop(0)
            elif not word.startswith("-D"):
                options.append(word)
        return shlex.join(options)

    def pg_ctl_run(self, *args, timeout=60):
        argv = [self.pg_ctl, "-D", self.pgdata, *args]
        if os.geteuid() == 0 and self.owner != "root":
            argv = ["runuser", "-u", self.owner, "--", *argv]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return 1, f"{shlex.join(argv)} did not finish within {timeout} s"
        return done.returncode, (done.stdout + done.stderr).strip()

    def running(self):
        return self.pg_ctl_run("status", timeout=20)[0] == 0

    def check_serves(self, admin_url):
        """Exit unless the cluster runs and is the one the URL reaches: never stop another."""
        if not self.running():
            sys.exit(f"two_machines: pg_ctl status says no server runs on {self.pgdata}")
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            served = conn.execute("SHOW data_directory").fetchone()[0]
        if os.path.realpath(served) != os.path.realpath(self.pgdata):
            sys.exit(f"two_machines: DEALERSHIP_TEST_DATABASE_URL reaches the cluster of {served}, "
                     f"not DEALERSHIP_TEST_PGDATA={self.pgdata}")

    def stop_immediate(self):
        self.down = True
        code, output = self.pg_ctl_run("stop", "-m", "immediate", "-w", "-t", "30")
        if code != 0:
            sys.exit(f"two_machines: pg_ctl stop failed ({code}): {output}")

    def start(self):
        code, output = self.pg_ctl_run("start", "-w", "-t", "60", "-l", self.log, "-o", self.options, timeout=90)
        if code == 0:
            self.down = False
        return code == 0, f"pg_ctl start: {code}: {output}; see {self.log}"

    def ensure_running(self):
        """However the check ends: a cluster it stopped is started again."""
        if self.down and not self.running():
            started, why = self.start()
            if not started:
                say(f"could not start PostgreSQL again ({why}): start it by hand")


# -- what every check ends with --------------------------------------------------------------------


def instant(text):
    return datetime.fromisoformat(text)


def overlapping(bookings):
    """Pairs of overlapping bookings of one car among API bookings."""
    by_car, found = defaultdict(list), []
    for b in bookings:
        by_car[b["car_id"]].append((instant(b["start_datetime"]), instant(b["end_datetime"]), b["id"]))
    for car_id, spans in by_car.items():
        spans.sort()
        for (_, end_a, id_a), (start_b, _, id_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                found.append((car_id, id_a, id_b))
    return found


def whole_feed(port):
    """Every change the feed holds, followed page by page through `port`; None if it did not answer 200."""
    client, changes, since = Client(port, timeout=30), [], None
    while True:
        answer = client.call("GET", f"{API}/changes?limit=1000" + (f"&since={since}" if since else ""))
        if answer.status != 200:
            client.close()
            return None
        changes += answer.payload["changes"]
        if not answer.payload["changes"]:
            client.close()
            return changes
        since = answer.payload["next"]


def check_feed(label, instances, rows, problems):
    """The change feed, read whole through each instance: the same changes through both, each once, in
    cursor order, and the bookings it rebuilds are those the database holds."""
    feeds = {instance.name: whole_feed(instance.port) for instance in instances}
    if any(feed is None for feed in feeds.values()):
        problems.append(f"{label}: the change feed did not answer 200 on every instance")
        return
    (first_name, first), *others = feeds.items()
    for name, feed in others:
        if feed != first:
            problems.append(f"{label}: instance {name} follows another change feed than instance {first_name}")
    cursors = [tuple(map(int, change["cursor"].split("."))) for change in first]
    if cursors != sorted(set(cursors)):
        problems.append(f"{label}: the change feed's cursors are not each once and in order")
    rebuilt = {}
    for change in first:
        if change["type"] == "booking":
            if change["record"] is None:
                rebuilt.pop(change["id"], None)
            else:
                rebuilt[change["id"]] = change["record"]
    if set(rebuilt) != set(rows):
        problems.append(f"{label}: the change feed rebuilds {len(rebuilt)} bookings, the database holds {len(rows)} "
                        f"(e.g. {sorted(set(rebuilt) ^ set(rows))[:5]} differ)")
    say(f"{label}: the change feed, {len(first)} changes, reads the same through {len(feeds)} instances "
        "and rebuilds the bookings stored")


def check_store(label, url, instances, ledger, problems):
    """What the database and both instances hold against every write the ledger holds (all parts so far)."""
    problems_before = len(problems)
    created, uncertain, refused = {}, set(), set()
    for entry in filter(is_write, ledger.of()):
        answer, name = entry["answer"], entry["body"]["customer_name"]
        if answer.status == 201:
            created[answer.payload["id"]] = answer.payload
        elif answer.status == 409 or answer.refused or \
                (answer.status == 503 and UNKNOWN_OUTCOME not in describe(answer)):
            refused.add(name)  # nothing was changed, by the service's own word, or the request reached no server
        else:
            uncertain.add(name)  # cut off, of unknown outcome by the service's word, or an unexpected status
    rows, car_ids, sql_overlaps = stored(url)
    for booking_id, told in created.items():
        row = rows.get(booking_id)
        if row is None:
            problems.append(f"{label}: booking {booking_id} was acknowledged with 201 and is not in the database")
        elif row[1:] != (told["car_id"], told["customer_name"], told["customer_email"],
                         instant(told["start_datetime"]), instant(told["end_datetime"])):
            problems.append(f"{label}: booking {booking_id} is {row} in the database, but 201 said {told}")
    for booking_id, row in rows.items():
        if booking_id in created:
            continue
        if row[2] in refused:
            problems.append(f"{label}: booking {booking_id} ({row[2]}) is stored, but its request was refused")
        elif row[2] not in uncertain:
            problems.append(f"{label}: booking {booking_id} ({row[2]}) is stored and no request of it is unanswered")
    problems.extend(f"{label}: car {c}: bookings {a} and {b} overlap (SQL)" for c, a, b in sql_overlaps)

    listings = {}
    for instance in instances:
        for n in range(4):  # new connections: each worker in turn
            client = Client(instance.port, timeout=30)
            status, bookings = every_booking(client.get)
            cars = client.call("GET", f"{API}/cars")
            client.close()
            if status != 200 or cars.status != 200:
                problems.append(f"{label}: instance {instance.name} answered bookings {status}, cars {cars.status}")
                continue
            listings[(instance.name, n)] = (bookings, cars.payload)
    if not listings:
        return created
    first_key, (first_bookings, first_cars) = next(iter(listings.items()))
    for key, (bookings, cars) in listings.items():
        if (bookings, cars) != (first_bookings, first_cars):
            problems.append(f"{label}: instance {key[0]} (connection {key[1]}) answers other bookings or cars than "
                            f"instance {first_key[0]} (connection {first_key[1]})")
    by_id = {b["id"]: b for b in first_bookings}
    if set(by_id) != set(rows):
        problems.append(f"{label}: the API lists {len(by_id)} bookings, the database holds {len(rows)} "
                        f"(e.g. {sorted(set(by_id) ^ set(rows))[:5]} differ)")
    if [car["id"] for car in first_cars] != car_ids:
        problems.append(f"{label}: the API lists {len(first_cars)} cars, the database holds {len(car_ids)}")
    changed = [i for i, told in created.items() if i in by_id and by_id[i] != told]
    if changed:
        problems.append(f"{label}: {len(changed)} bookings are listed otherwise than their 201 said, "
                        f"e.g. {changed[:5]}")
    problems.extend(f"{label}: car {c}: bookings {a} and {b} overlap (API)"
                    for c, a, b in overlapping(first_bookings)[:20])
    check_feed(label, instances, rows, problems)
    say(f"{label}: {len(rows)} bookings in the database ({len(created)} acknowledged with 201 so far, "
        f"{len(uncertain)} requests of unknown outcome); {len(listings)} listings from {len(instances)} instances agree"
        if len(problems) == problems_before else f"{label}: the stored data does not check out")


def summary(label, entries, seconds):
    writes = [e for e in entries if is_write(e)]
    statuses = Counter(e["answer"].status for e in writes)
    say(f"{label}: {len(entries)} requests in {seconds:.1f} s ({len(entries) / seconds:.0f}/s), {len(writes)} writes: "
        f"{statuses[201]} 201, {statuses[409]} 409, {statuses[503]} 503, {statuses[None]} unanswered"
        + "".join(f", {n} {s}" for s, n in statuses.items() if s not in (201, 409, 503, None)))


def run_clients(targets, stop_event):
    """Start a daemon thread for each target; return them. join_clients ends them."""
    threads = [threading.Thread(target=target, args=(stop_event,), daemon=True) for target in targets]
    for thread in threads:
        thread.start()
    return threads


def join_clients(threads, stop_event, problems, label):
    stop_event.set()
    deadline = time.monotonic() + 30
    for thread in threads:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        problems.append(f"{label}: a client did not stop within 30 s")


# -- part 1: two machines -----------------------------------------------------------------------------


def two_machines(instances, car_ids, ledger, url, a, rng, problems):
    label = "two machines"
    hot = [(car_ids[i], 100 + 10 * i) for i in range(4)]  # (car, hour after T0): everyone fights over these
    own = car_ids[len(hot):]

    def client(n):
        port, crng = instances[n % 2].port, random.Random(rng.random())

        def loop(stop_event):
            c = Client(port)
            for serial in range(MAX_REQUESTS):
                if stop_event.is_set():
                    break
                roll, name = crng.random(), f"p1-c{n}-{serial}"
                if roll < 0.45:
                    car_id, hour = crng.choice(hot)
                    start = T0 + timedelta(hours=hour + crng.choice([0, 1]))
                    body = booking_body(name, car_id, start, crng.choice([1, 2, 3]))
                    answer = ledger.call(c, label, "hot", "POST", f"{API}/bookings", body)
                elif roll < 0.7:
                    body = booking_body(name, own[n % len(own)], T0 + timedelta(hours=crng.randrange(1000, 9000)), 2)
                    answer = ledger.call(c, label, "own", "POST", f"{API}/bookings", body)
                elif roll < 0.85:
                    path = f"{API}/bookings?car_id={crng.choice(hot)[0]}&limit=100"
                    answer = ledger.call(c, label, "read", "GET", path)
                else:
                    answer = ledger.call(c, label, "read", "GET", f"{API}/cars/{crng.choice(car_ids)}")
                if answer.status is None:
                    time.sleep(0.1)  # its instance is down: try again shortly
        return loop

    victim = instances[rng.randrange(2)]
    stop_event = threading.Event()
    began = time.monotonic()
    threads = run_clients([client(n) for n in range(a.clients)], stop_event)
    killed = ready = None
    try:
        time.sleep(a.seconds * 0.35)
        killed = time.monotonic()
        victim.kill()
        say(f"{label}: instance {victim.name} (port {victim.port}) killed with SIGKILL, its process group "
            f"{a.seconds * 0.35:.1f} s into the load")
        time.sleep(1.0)
        victim.start()
        ready = time.monotonic()
        say(f"{label}: instance {victim.name} answers again on port {victim.port}, "
            f"{ready - killed:.1f} s after the kill")
        time.sleep(max(0.0, began + a.seconds - time.monotonic(), ready + 4 - time.monotonic()))
    finally:
        join_clients(threads, stop_event, problems, label)
    elapsed = time.monotonic() - began

    entries = ledger.of(label)
    for e in entries:
        answer, outage = e["answer"], e["port"] == victim.port and killed is not None and \
            killed - 0.1 <= e["ended"] and e["began"] <= (ready or float("inf")) + 1.0
        expected = {201, 409} if is_write(e) else {200}
        if answer.status is None and outage:
            continue  # the killed instance, between the kill and its restart
        if answer.status not in expected:
            problems.append(f"{label}: {e['method']} {e['path']} on port {e['port']} answered {describe(answer)}")
    summary(label, entries, elapsed)
    hot_201 = sum(1 for e in entries if e["kind"] == "hot" and e["answer"].status == 201)
    if hot_201 > 4 * len(hot):  # each hot slot spans hours [h, h + 4): at most four bookings fit in it
        problems.append(f"{label}: {hot_201} bookings of the hot slots were accepted")
    say(f"{label}: {hot_201} of {sum(1 for e in entries if e['kind'] == 'hot')} hot-slot bookings accepted; "
        f"{sum(1 for e in entries if e['answer'].status is None)} requests unanswered while instance "
        f"{victim.name} was down")
    check_store(label, url, instances, ledger, problems)


# -- part 2: PostgreSQL stopped and started under load ---------------------------------------------


def fault_run(instances, car_ids, ledger, cluster, a, rng, problems):
    label = "fault run"
    hot = [(car_ids[i], 20_000 + 10 * i) for i in range(2)]
    own = car_ids[len(hot):]
    marks = {}

    def writer(n):
        port, crng = instances[n % 2].port, random.Random(rng.random())

        def loop(stop_event):
            c = Client(port, fresh=True)
            for serial in range(MAX_REQUESTS):
                if stop_event.is_set():
                    break
                name = f"p2-w{n}-{serial}"
                if crng.random() < 0.3:
                    car_id, hour = crng.choice(hot)
                    body = booking_body(name, car_id, T0 + timedelta(hours=hour + crng.choice([0, 1])),
                                        crng.choice([1, 2]))
                else:
                    body = booking_body(name, own[n % len(own)],
                                        T0 + timedelta(hours=crng.randrange(10_000, 19_000)), 1)
                answer = ledger.call(c, label, "write", "POST", f"{API}/bookings", body)
                time.sleep(0.02 if answer.status in (201, 409) else 0.05)
        return loop

    def reader(n):
        port = instances[n % 2].port

        def loop(stop_event):
            c = Client(port, fresh=True)
            for serial in range(MAX_REQUESTS):
                if stop_event.is_set():
                    break
                path = f"{API}/cars" if serial % 2 else f"{API}/bookings?car_id={hot[serial // 2 % 2][0]}"
                ledger.call(c, label, "read", "GET", path)
                time.sleep(0.02)
        return loop

    def prober(n):
        port = instances[n % 2].port

        def loop(stop_event):
            for _ in range(MAX_REQUESTS):
                if stop_event.is_set():
                    break
                ledger.call(Client(port, fresh=True), label, "health", "GET", "/health")
                time.sleep(0.1)
        return loop

    stop_event = threading.Event()
    began = time.monotonic()
    threads = run_clients([writer(n) for n in range(6)] + [reader(n) for n in range(4)] + [prober(n) for n in range(2)],
                          stop_event)
    try:
        time.sleep(3.0)
        marks["stopping"] = time.monotonic()
        cluster.stop_immediate()
        marks["down"] = time.monotonic()
        say(f"{label}: PostgreSQL stopped (immediate) in {marks['down'] - marks['stopping']:.1f} s, under load")
        time.sleep(a.down)
        marks["starting"] = time.monotonic()
        started, why = cluster.start()
        if not started:
            sys.exit(f"two_machines: {why}")
        marks["up"] = time.monotonic()
        say(f"{label}: PostgreSQL started again in {marks['up'] - marks['starting']:.1f} s, after "
            f"{marks['starting'] - marks['down']:.1f} s down")
        # load on until, for 3 s, each instance has answered writes (several 201s) and /health (200) and
        # nothing else; at most RECOVERY_BOUND + 3 s
        while time.monotonic() < marks["up"] + RECOVERY_BOUND + 3:
            time.sleep(0.25)
            now = time.monotonic()
            recent = [e for e in ledger.of(label) if e["began"] >= marks["up"] and e["ended"] >= now - 3]
            if now - marks["up"] >= 3 and all(recovered(recent, instance.port) for instance in instances):
                break
    finally:
        join_clients(threads, stop_event, problems, label)
    elapsed = time.monotonic() - began

    entries = ledger.of(label)
    summary(label, entries, elapsed)
    down, up = marks["down"], marks["up"]
    after = [e for e in entries if e["began"] >= up]

    # while it was down: writes 503 with problem+json and Retry-After, reads 200 from memory (at once),
    # /health 503; each seen on each instance
    began_down = [e for e in entries if down <= e["began"] < marks["starting"]]
    for e in began_down:
        answer, answered_down = e["answer"], e["ended"] <= marks["starting"]
        if e["kind"] == "write" and answered_down and (
                answer.status != 503 or "retry-after" not in answer.headers
                or answer.headers.get("content-type") != "application/problem+json"):
            problems.append(f"{label}: while PostgreSQL was down, a write answered {answer.status} "
                            f"{answer.headers.get('content-type')} Retry-After {answer.headers.get('retry-after')}")
        elif e["kind"] == "health" and answered_down and answer.status != 503:
            problems.append(f"{label}: while PostgreSQL was down, /health on port {e['port']} answered {answer.status}")
    for e in entries:  # reads answer from memory, whatever the database does; every request is answered
        if e["answer"].status is None or e["kind"] == "read" and (
                e["answer"].status != 200 or not isinstance(e["answer"].payload, list)):
            problems.append(f"{label}: {e['method']} {e['path']} on port {e['port']} answered {describe(e['answer'])}")
    for instance in instances:
        seen = []
        for kind, what in (("write", "writes"), ("read", "reads"), ("health", "/health")):
            begun = [e for e in began_down if e["port"] == instance.port and e["kind"] == kind]
            answered = [e for e in begun if e["ended"] <= marks["starting"]]
            slowest = max((e["ended"] - e["began"] for e in begun), default=0.0)
            codes = ", ".join(f"{n} {status}" for status, n in Counter(e["answer"].status for e in answered).items())
            seen.append(f"{what}: {len(begun)} begun, {len(answered)} answered ({codes or 'none'}), the slowest "
                        f"in {slowest:.1f} s")
            if not answered:
                held = max((e["ended"] - e["began"] for e in entries if e["port"] == instance.port
                            and e["kind"] == kind and e["began"] < down < e["ended"]), default=0.0)
                problems.append(f"{label}: instance {instance.name}: no {what} answered while PostgreSQL was down "
                                f"({a.down:.0f} s): {len(begun)} begun then (the slowest took {slowest:.1f} s), and "
                                f"those in flight when it stopped took up to {held:.1f} s")
            slow = [e for e in begun if e["ended"] - e["began"] > READ_BOUND]
            if kind == "read" and slow:
                problems.append(f"{label}: instance {instance.name}: {len(slow)} of {len(begun)} reads begun while "
                                f"PostgreSQL was down took over {READ_BOUND:.0f} s (the slowest {slowest:.1f} s): "
                                "not answered from memory")
        say(f"{label}: instance {instance.name} while PostgreSQL was down: " + "; ".join(seen))

    # once it is back: writes succeed again within RECOVERY_BOUND, and so does /health, on each instance
    for instance in instances:
        mine = [e for e in after if e["port"] == instance.port]
        writes = [e for e in mine if e["kind"] == "write"]
        probes = [e for e in mine if e["kind"] == "health"]
        first_201 = min((e["ended"] for e in writes if e["answer"].status == 201), default=None)
        last_write_503 = max((e["ended"] for e in writes if e["answer"].status not in (201, 409)), default=up)
        first_health = min((e["ended"] for e in probes if e["answer"].status == 200), default=None)
        last_health_503 = max((e["ended"] for e in probes if e["answer"].status != 200), default=up)
        if first_201 is None or last_write_503 - up > RECOVERY_BOUND:
            problems.append(f"{label}: instance {instance.name}: writes did not succeed again within "
                            f"{RECOVERY_BOUND:.0f} s of PostgreSQL being back")
        if first_health is None or last_health_503 - up > RECOVERY_BOUND:
            problems.append(f"{label}: instance {instance.name}: /health did not answer 200 again within "
                            f"{RECOVERY_BOUND:.0f} s of PostgreSQL being back")
        for e in mine:
            if e["kind"] == "write" and e["answer"].status not in (201, 409, 503):
                problems.append(f"{label}: after PostgreSQL was back, a write answered {e['answer'].status} "
                                f"{e['answer'].error or e['answer'].payload}")
        say(f"{label}: instance {instance.name}: the first 201 {fmt(first_201, up)} and the last refused write "
            f"{fmt(last_write_503, up)} after PostgreSQL was back; /health 200 from {fmt(first_health, up)}, "
            f"its last 503 {fmt(last_health_503, up)}")
    for instance in instances:  # every worker: new connections
        for n in range(8):
            answer = Client(instance.port, fresh=True).call("GET", "/health")
            if answer.status != 200 or not isinstance((answer.payload or {}).get("pool"), dict):
                problems.append(f"{label}: at the end, /health on instance {instance.name} answered {answer.status} "
                                f"{answer.payload}")
                break
        if instance.process.poll() is not None:
            problems.append(f"{label}: instance {instance.name} exited with {instance.process.returncode}")


def quiet_restart(instances, car_ids, ledger, cluster, problems):
    """PostgreSQL stopped (immediate) right after refused writes that every worker has caught up past,
    with no load: the writers acknowledged after its restart must be listed by every worker. (After a
    crash PostgreSQL may hand out again the transaction ids of transactions whose WAL never reached
    the disk, such as refused writes: a change log read by transaction id must not miss those.)"""
    label = "quiet restart"
    car_id, start = car_ids[-1], T0 + timedelta(hours=40_000)
    first = ledger.call(Client(instances[0].port), label, "write", "POST", f"{API}/bookings",
                        booking_body("p3-first", car_id, start, 2))
    if first.status != 201:
        problems.append(f"{label}: the first booking answered {describe(first)}")
        return
    for instance in instances:
        client = Client(instance.port)
        for n in range(20):  # each takes a transaction id (it locks the car's row), then rolls back: 409
            answer = ledger.call(client, label, "write", "POST", f"{API}/bookings",
                                 booking_body(f"p3-clash-{instance.name}-{n}", car_id, start, 1))
            if answer.status != 409:
                problems.append(f"{label}: a clashing booking on instance {instance.name} answered {describe(answer)}")
    for instance in instances:  # every worker catches up past those transaction ids
        for _ in range(4):
            Client(instance.port, fresh=True).call("GET", f"{API}/bookings?car_id={car_id}")
    cluster.stop_immediate()
    started, why = cluster.start()
    if not started:
        sys.exit(f"two_machines: {why}")
    acknowledged = {}
    for n, instance in enumerate(instances):
        client, deadline = Client(instance.port, fresh=True), time.monotonic() + RECOVERY_BOUND
        body = booking_body(f"p3-after-{instance.name}", car_id, start + timedelta(days=10 + n), 2)
        while time.monotonic() < deadline:
            answer = ledger.call(client, label, "write", "POST", f"{API}/bookings", dict(body))
            if answer.status == 201:
                acknowledged[answer.payload["id"]] = instance.name
                break
            body["customer_name"] += "'"  # a new name for each try: every request is told apart
            time.sleep(0.5)
        else:
            problems.append(f"{label}: instance {instance.name} did not take a booking within {RECOVERY_BOUND:.0f} s "
                            "of PostgreSQL's restart")
    missing = []
    for instance in instances:  # every worker, over new connections, eight times in a row within 10 s
        streak, deadline, last = 0, time.monotonic() + 10, set()
        while streak < 8 and time.monotonic() < deadline:
            answer = Client(instance.port, fresh=True).call("GET", f"{API}/bookings?car_id={car_id}")
            last = set(acknowledged) - ({b["id"] for b in answer.payload} if answer.status == 200 else set())
            streak = 0 if last else streak + 1  # a worker's first read after the restart may fail to catch up
            if last:
                time.sleep(0.2)
        missing += [f"instance {instance.name} still does not list booking {i} (acknowledged by instance "
                    f"{acknowledged[i]}), asked for 10 s over new connections" for i in sorted(last)]
    problems.extend(f"{label}: {line}" for line in missing)
    say(f"{label}: PostgreSQL stopped and started after 40 refused writes; bookings {sorted(acknowledged)} "
        f"acknowledged after it, " + ("not listed everywhere" if missing else "listed by every worker"))


def recovered(recent, port):
    """Whether these requests to `port` show it recovered: five writes 201, a /health 200, nothing refused."""
    mine = [e for e in recent if e["port"] == port]
    return sum(e["kind"] == "write" and e["answer"].status == 201 for e in mine) >= 5 and \
        any(e["kind"] == "health" and e["answer"].status == 200 for e in mine) and \
        not any(e["answer"].status not in (200, 201, 409) for e in mine)


def fmt(moment, origin):
    return "never" if moment is None else f"{moment - origin:.1f} s"


# -- the run ----------------------------------------------------------------------------------------


def fill_cars(instance, count):
    client = Client(instance.port)
    car_ids = []
    for n in range(count):
        answer = client.call("POST", f"{API}/cars", {
            "brand": "Skoda", "model": "Octavia", "year": 2024, "color": "Grey", "daily_price": 52.0,
            "vin": f"TMBJJ7NE0K{n:07d}", "dealer_id": 1})
        if answer.status != 201:
            sys.exit(f"two_machines: filling cars failed with {answer.status}: {answer.payload or answer.error}")
        car_ids.append(answer.payload["id"])
    return car_ids


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=12, help="part 1's load (5 to 60)")
    ap.add_argument("--clients", type=int, default=16, help="part 1's clients (2 to 64)")
    ap.add_argument("--cars", type=int, default=24)
    ap.add_argument("--down", type=float, default=3, help="part 2: seconds PostgreSQL stays down (1 to 60)")
    ap.add_argument("--no-fault", action="store_true", help="part 1 only: no PostgreSQL stop and start")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    if not 5 <= a.seconds <= 60 or not 2 <= a.clients <= 64 or not 8 <= a.cars <= 1000 or not 1 <= a.down <= 60:
        sys.exit("two_machines: --seconds 5 to 60, --clients 2 to 64, --cars 8 to 1000, --down 1 to 60")
    admin_url = os.environ.get("DEALERSHIP_TEST_DATABASE_URL", "")
    if not admin_url.startswith(("postgresql://", "postgres://")):
        sys.exit("two_machines: set DEALERSHIP_TEST_DATABASE_URL to a postgresql:// URL of a superuser")
    cluster = None if a.no_fault else Cluster()
    if cluster is not None:
        try:
            cluster.check_serves(admin_url)
        except psycopg.Error as error:
            sys.exit(f"two_machines: cannot connect with DEALERSHIP_TEST_DATABASE_URL: {str(error).strip()}")
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    say(f"seed {seed}")
    rng = random.Random(seed)

    name = f"two_machines_{os.getpid()}"
    url = database_url(admin_url, name)
    instances, created, problems, ledger = [], False, [], Ledger()
    try:
        try:
            admin(admin_url, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except psycopg.Error as error:
            sys.exit(f"two_machines: cannot create database {name}: {str(error).strip()}")
        created = True
        instances = [Instance("A", url, 2, 8), Instance("B", url, 2, 8)]
        for instance in instances:
            instance.start()
        say(f"database {name}; instance A on port {instances[0].port}, B on {instances[1].port}, 2 workers each")
        car_ids = fill_cars(instances[0], a.cars)
        two_machines(instances, car_ids, ledger, url, a, rng, problems)
        if cluster is not None:
            fault_run(instances, car_ids, ledger, cluster, a, rng, problems)
            quiet_restart(instances, car_ids, ledger, cluster, problems)
            check_store("after the faults", url, instances, ledger, problems)
    except psycopg.Error as error:
        problems.append(f"PostgreSQL could not be read: {str(error).strip()}")
    finally:
        for instance in instances:
            instance.stop()
        if cluster is not None:
            cluster.ensure_running()
        if created:
            try:
                admin(admin_url, sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            except psycopg.Error as error:
                say(f"could not drop database {name}: {str(error).strip()}")
    return verdict("two_machines", problems)


if __name__ == "__main__":
    try:
        sys.exit(run(main))
    except KeyboardInterrupt:
        sys.exit("two_machines: interrupted; the servers it started are stopped")
