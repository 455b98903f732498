#!/usr/bin/env python3
"""Requests per second through a real HTTP server, against a bare Flask app under the same server.

    python .ci/throughput.py                      # `flask --app dealership serve`: default workers and --workers 1
    python .ci/throughput.py --compare            # waitress, gunicorn (gthread) and Granian, each with 1 and N workers
    python .ci/throughput.py --seconds 5 --connections 32
    python .ci/throughput.py --engines            # new bookings/s through `serve` on a SQLite file and on PostgreSQL
    python .ci/throughput.py --observe            # what the access log and the metrics cost under `serve`

For each server it starts the service on loopback on a new database file, fills 200 cars and 2,000
bookings through the API, and drives it with a fixed number of keep-alive clients for a fixed time
per request kind: GET /api/v1/cars/{id} (the 200 cars in turn), available-cars (a period with half
the fleet busy), POST /api/v1/bookings on fresh slots (every request a new car and period, so all are
201), and a mix of the three (50/30/20). It then starts the bare app (.ci/bare.py: Flask answering
the service's own bodies as ready bytes, and parsing each POST's body) under the same server command
beside it, and runs the same load on each in turn, kind by kind, so that each figure is a ratio
measured side by side: service / bare requests per second.

Clients: wrk (Debian's `wrk` package) when installed, with 2 threads; else a Python client of the
same shape, much slower, whose figures are only good for ratios. The clients and the server share
the machine's cores, so requests/s are lower than a server alone would reach. --compare installs
gunicorn and Granian into the running environment if they are missing (they are not requirements).
The servers' logs are removed at the end unless a target is missed or a request failed: then they
are kept and their paths printed.

--engines runs `serve` (default workers, durable commits: DEALERSHIP_SYNCHRONOUS=full, PostgreSQL's
synchronous_commit as the server has it) on a new SQLite file and then on a new PostgreSQL database of the
server of DEALERSHIP_TEST_DATABASE_URL (a superuser's URL; the database is dropped after), fills each
alike and drives only new bookings on different cars: requests/s and p99 of both, side by side.

--observe runs `serve` (default workers) four times at once, with the access log and metrics both
off, each alone, and both on (serve's default), beside the bare app, and drives GET
/api/v1/cars/{id} and the mix against each in turn, five rounds, each begun with another: each
setting's requests/s and the servers' CPU time per request against both off, and against the bare app.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import http.client
import urllib.request
from datetime import datetime, timedelta, timezone

from serve import HOST, ROOT, SCRATCH, free_port, new_log, run, stop, wait_for

CI = os.path.dirname(os.path.abspath(__file__))
CARS, PER_CAR = 200, 10
FAR = datetime(2040, 1, 1, tzinfo=timezone.utc)  # fresh slots for the POST load start here
PERIOD = datetime(2036, 1, 1, 12, tzinfo=timezone.utc)  # half the fleet is busy over it
KINDS = ("car", "available", "book", "mix")
LUA = """
local counter, cars = 0, %(cars)d
local base = %(base)d + (os.getenv("WRK_KIND") == "mix" and 3153600000 or 0)  -- the mix books a century later
local available = "%(available)s"
function setup(thread) thread:set("id", next_id or 0); next_id = (next_id or 0) + 1 end
local function book()
  counter = counter + 1
  local start = base + (id * 10000000 + math.floor(counter / cars)) * 7200
  local body = string.format('{"car_id":%%d,"customer_name":"Load","customer_email":"load@example.com",' ..
    '"start_datetime":"%%s","end_datetime":"%%s"}', counter %% cars + 1,
    os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ", start), os.date("!%%Y-%%m-%%dT%%H:%%M:%%SZ", start + 3600))
  return wrk.format("POST", "/api/v1/bookings", {["Content-Type"] = "application/json"}, body)
end
local function car() counter = counter + 1; return wrk.format("GET", "/api/v1/cars/" .. (counter %% cars + 1)) end
local function avail() return wrk.format("GET", available) end
local kinds = {car = car, available = avail, book = book}
function request()
  if kind == "mix" then
    local roll = math.random(100)
    if roll <= 50 then return car() elseif roll <= 80 then return avail() else return book() end
  end
  return kinds[kind]()
end
"""


def available_path():
    start, end = PERIOD.isoformat().replace("+", "%2B"), (PERIOD + timedelta(hours=6)).isoformat().replace("+", "%2B")
    return f"/api/v1/bookings/available-cars?start_datetime={start}&end_datetime={end}"


def call(base, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def fill(base):
    """200 cars and 2,000 bookings; half the cars busy over PERIOD. Returns the bare app's bodies."""
    for n in range(CARS):
        status, _ = call(base, "POST", "/api/v1/cars", {
            "brand": "Toyota", "model": "Corolla", "year": 2024, "color": "White", "daily_price": 59.9 + n % 7,
            "vin": f"JTDBR32E7{n:08d}", "dealer_id": 1})
        assert status == 201
    for n in range(CARS):
        for k in range(PER_CAR):
            start = PERIOD - timedelta(days=PER_CAR // 2 - k) + (timedelta(hours=-2) if n % 2 else timedelta(hours=13))
            status, booked = call(base, "POST", "/api/v1/bookings", {
                "car_id": n + 1, "customer_name": "Fill", "customer_email": "fill@example.com",
                "start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=10)).isoformat()})
            assert status == 201
    return {"cars": {n: call(base, "GET", f"/api/v1/cars/{n}")[1].decode() for n in range(1, CARS + 1)},
            "available": call(base, "GET", available_path())[1].decode(), "booked": booked.decode()}


def command(server, workers, target, port):
    """The command line that serves `target` (module:factory) with `server` and `workers`."""
    module, _, factory = target.partition(":")
    if server == "serve":
        assert module == "dealership"
        return [sys.executable, "-m", "flask", "--app", "dealership", "serve", "--host", HOST, "--port", str(port)] + \
            ([] if workers is None else ["--workers", str(workers)])
    if server == "waitress":
        return [sys.executable, os.path.join(CI, "waitress_workers.py"), target, "--port", str(port),
                "--workers", str(workers or os.cpu_count()), "--threads", "8"]
    if server == "gunicorn":
        return [sys.executable, "-m", "gunicorn", "-w", str(workers or os.cpu_count()), "-k", "gthread", "--threads", "8",
                "-b", f"{HOST}:{port}", "--log-level", "warning", f"{module}:{factory}()"]
    if server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "wsgi", "--workers", str(workers or os.cpu_count()),
                "--blocking-threads", "8", "--host", HOST, "--port", str(port), "--log-level", "warning",
                "--factory", target]
    raise ValueError(server)


def start(server, workers, target, env):
    port = free_port()
    log = new_log(prefix="dealership-throughput-")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {"TMPDIR": SCRATCH} | env
    environ["PYTHONPATH"] = os.pathsep.join([ROOT, CI, environ.get("PYTHONPATH", "")])
    with log:
        process = subprocess.Popen(command(server, workers, target, port), cwd=ROOT, env=environ, stdout=log,
                                   stderr=subprocess.STDOUT)
    process.log = log.name
    base = f"http://{HOST}:{port}"
    try:
        wait_for(f"{base}/health", process, seconds=60)
    except BaseException:
        stop(process)
        raise
    return process, base


WRK_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def drive(base, kind, seconds, connections, script):
    """(requests/s, p50 ms, p99 ms, failures) for one kind of request."""
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, base],
                             env=os.environ | {"WRK_KIND": kind}, capture_output=True, text=True, timeout=seconds + 60).stdout
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
        latency = {p: float(v) * scale[u] for p, v, u in WRK_LATENCY.findall(out)}
        failures = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", out))
        failures += sum(int(n) for n in re.findall(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                                                    out)[0]) if "Socket errors" in out else 0
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), latency["50"], latency["99"], failures
    return python_client(base, kind, seconds, connections)


def python_client(base, kind, seconds, connections):
    """The same load from threads of keep-alive http.client connections (when wrk is missing)."""
    port = int(base.rsplit(":", 1)[1])
    deadline, times, failures, lock = time.monotonic() + seconds, [], [0], threading.Lock()

    def client(n):
        conn, counter, mine = http.client.HTTPConnection(HOST, port, timeout=30), 0, []
        while time.monotonic() < deadline:
            counter += 1
            which = kind if kind != "mix" else ("car", "car", "car", "car", "car", "available", "available",
                                                "available", "book", "book")[counter % 10]
            if which == "car":
                method, path, body = "GET", f"/api/v1/cars/{counter % CARS + 1}", None
            elif which == "available":
                method, path, body = "GET", available_path(), None
            else:
                # each connection books its own run of 100,000 two-hour slots per car (about 23 years:
                # 16 connections stay far below year 9999, which the Lua script's 10,000,000 per wrk
                # thread would pass here), and the mix a century after the POST load, as in the Lua
                # script: else its bookings would take the very slots that load took and be refused (409)
                start = FAR + timedelta(days=36500 if kind == "mix" else 0, hours=2 * (n * 100_000 + counter // CARS))
                method, path = "POST", "/api/v1/bookings"
                body = json.dumps({"car_id": counter % CARS + 1, "customer_name": "Load", "customer_email": "load@example.com",
                                   "start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=1)).isoformat()})
            t = time.perf_counter()
            conn.request(method, path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            mine.append(time.perf_counter() - t)
            if response.status >= 300:
                with lock:
                    failures[0] += 1
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times.sort()
    return (len(times) / seconds, times[len(times) // 2] * 1000, times[int(len(times) * 0.99)] * 1000, failures[0])


def measure(server, workers, a, folder):
    """{kind: (service figures, bare figures)} for one server and worker count. Both servers run at
    once and each kind is driven against the service and then the bare app, so that a machine that
    slows down or speeds up over the run (it is shared) moves both figures of a ratio alike."""
    database = os.path.join(tempfile.mkdtemp(dir=folder), f"{server}-{workers}.sqlite3")
    service, base = start(server, workers, "dealership:create_app", {"DEALERSHIP_DATABASE": database})
    bare = None
    try:
        bodies = fill(base)
        with open(os.path.join(folder, "bodies.json"), "w") as f:
            json.dump(bodies, f)
        script = os.path.join(folder, "load.lua")
        with open(script, "w") as f:
            f.write(LUA % {"cars": CARS, "base": int(FAR.timestamp()), "available": available_path()})
            f.write('\nkind = os.getenv("WRK_KIND")\n')
        # the bare app under the same server, with as many processes (`serve` runs SERVE_SERVER)
        bare_server = SERVE_SERVER if server == "serve" else server
        bare_workers = workers if workers is not None else os.cpu_count()
        bare, bare_base = start(bare_server, bare_workers, "bare:create_app",
                                {"DEALERSHIP_BARE_BODIES": os.path.join(folder, "bodies.json")})
        return {kind: (drive(base, kind, a.seconds, a.connections, script),
                       drive(bare_base, kind, a.seconds, a.connections, script)) for kind in KINDS}
    finally:
        stop(service)
        if bare is not None:
            stop(bare)


SERVE_SERVER = "waitress"  # what `flask --app dealership serve` runs, one process per worker (see serve_command)


def report(name, results):
    print(f"\n{name}")
    print(f"{'kind':10} {'service req/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'bare req/s':>11} {'service/bare':>13} {'failures':>9}")
    for kind, ((rps, p50, p99, failed), (bare_rps, _, _, bare_failed)) in results.items():
        print(f"{kind:10} {rps:14.0f} {p50:8.2f} {p99:8.2f} {bare_rps:11.0f} {rps / bare_rps:13.2f} {failed + bare_failed:9d}")


def new_postgres_database(name):
    """A new database on the server of DEALERSHIP_TEST_DATABASE_URL, and its URL."""
    import psycopg
    from urllib.parse import urlsplit, urlunsplit

    url = os.environ.get("DEALERSHIP_TEST_DATABASE_URL")
    if not url:
        sys.exit("throughput: --engines needs DEALERSHIP_TEST_DATABASE_URL, a superuser's URL")
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def drop_postgres_database(name):
    import psycopg

    with psycopg.connect(os.environ["DEALERSHIP_TEST_DATABASE_URL"], autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def measure_engines(a, folder):
    """New bookings per second through `serve` with its default workers, on a SQLite file and on
    PostgreSQL: {engine: (requests/s, p50, p99, failures)}."""
    name = f"dealership_throughput_{os.getpid()}"
    results = {}
    for engine, database in [("SQLite file", os.path.join(folder, "engines.sqlite3")),
                             ("PostgreSQL", new_postgres_database(name))]:
        service, base = start("serve", None, "dealership:create_app", {"DEALERSHIP_DATABASE": database})
        try:
            fill(base)
            script = os.path.join(folder, "load.lua")
            with open(script, "w") as f:
                f.write(LUA % {"cars": CARS, "base": int(FAR.timestamp()), "available": available_path()})
                f.write('\nkind = os.getenv("WRK_KIND")\n')
            results[engine] = drive(base, "book", a.seconds, a.connections, script)
        finally:
            stop(service)
    drop_postgres_database(name)
    return results


OBSERVING = {"both off": {"DEALERSHIP_ACCESS_LOG": "off", "DEALERSHIP_METRICS": "off"},
             "access log on": {"DEALERSHIP_ACCESS_LOG": "on", "DEALERSHIP_METRICS": "off"},
             "metrics on": {"DEALERSHIP_ACCESS_LOG": "off", "DEALERSHIP_METRICS": "on"},
             "both on": {"DEALERSHIP_ACCESS_LOG": "on", "DEALERSHIP_METRICS": "on"}}


def cpu_seconds(pid):
    """CPU time (user and system) used so far by a process and its children still running (Linux)."""
    pids, total = [pid], 0
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids += [int(child) for child in f.read().split()]
    for one in pids:
        with open(f"/proc/{one}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def measure_observing(a, folder, rounds=5):
    """GET /cars/{id} and the mix under serve with each of OBSERVING's settings, and the bare app: all
    five run at once and are driven in turn, round after round, so that a machine whose speed drifts
    moves every figure of a round alike. Prints the medians over the rounds; returns the failures."""
    servers, bodies = {}, None
    kinds = ("car", "mix")
    try:
        for label, settings in OBSERVING.items():
            database = os.path.join(tempfile.mkdtemp(dir=folder), "observe.sqlite3")
            servers[label] = start("serve", None, "dealership:create_app", {"DEALERSHIP_DATABASE": database} | settings)
            bodies = fill(servers[label][1])
        with open(os.path.join(folder, "bodies.json"), "w") as f:
            json.dump(bodies, f)
        servers["bare"] = start(SERVE_SERVER, os.cpu_count(), "bare:create_app",
                                {"DEALERSHIP_BARE_BODIES": os.path.join(folder, "bodies.json")})
        figures = {label: {kind: [] for kind in kinds} for label in servers}
        for round_ in range(rounds):
            script = os.path.join(folder, f"load-{round_}.lua")
            with open(script, "w") as f:  # each round books two centuries after the one before
                f.write(LUA % {"cars": CARS, "base": int(FAR.timestamp()) + round_ * 6_307_200_000,
                               "available": available_path()})
                f.write('\nkind = os.getenv("WRK_KIND")\n')
            order = list(servers.items())
            order = order[round_ % len(order):] + order[:round_ % len(order)]  # each round starts with another
            for kind in kinds:
                for label, (process, base) in order:
                    used = cpu_seconds(process.pid)
                    rps, p50, p99, failed = drive(base, kind, a.seconds, a.connections, script)
                    cpu = (cpu_seconds(process.pid) - used) / (rps * a.seconds) * 1e6  # µs of server CPU a request
                    figures[label][kind].append((rps, p50, p99, failed, cpu))
    finally:
        for process, _ in servers.values():
            stop(process)

    def median(values):
        return sorted(values)[len(values) // 2]

    print(f"\n`serve` (default workers) with each setting, {rounds} rounds: medians of requests/s, of p99, of the "
          "servers' CPU time per request, and of each round's ratios")
    print(f"{'setting':15} {'kind':5} {'req/s':>7} {'p99 ms':>7} {'/both off':>10} {'/bare':>7} {'CPU µs':>7} "
          f"{'CPU /both off':>14}")
    for label in OBSERVING:
        for kind in kinds:
            runs = figures[label][kind]
            against = [run[0] / off[0] for run, off in zip(runs, figures["both off"][kind])]
            bare = [run[0] / plain[0] for run, plain in zip(runs, figures["bare"][kind])]
            cpu = [run[4] / off[4] for run, off in zip(runs, figures["both off"][kind])]
            print(f"{label:15} {kind:5} {median([r[0] for r in runs]):7.0f} {median([r[2] for r in runs]):7.1f} "
                  f"{median(against):10.2f} {median(bare):7.2f} {median([r[4] for r in runs]):7.0f} {median(cpu):14.2f}")
    return sum(run[3] for label in figures for kind in kinds for run in figures[label][kind])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="per kind of request")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--compare", action="store_true", help="waitress, gunicorn and Granian with 1 and N workers")
    ap.add_argument("--engines", action="store_true", help="new bookings/s on a SQLite file and on PostgreSQL")
    ap.add_argument("--observe", action="store_true", help="the access log and metrics, each on and off")
    a = ap.parse_args()
    cores = os.cpu_count()
    print(f"machine: {cores} cores; clients ({'wrk -t2' if shutil.which('wrk') else 'Python threads'}, "
          f"{a.connections} keep-alive connections, {a.seconds} s per kind) and servers share them")
    folder = tempfile.mkdtemp(prefix="dealership-throughput-")
    problems = []
    if a.observe:
        try:
            failed = measure_observing(a, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print("throughput: no request failed" if not failed else f"throughput: {failed} requests failed")
        return 1 if failed else 0
    if a.engines:
        try:
            results = measure_engines(a, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        print(f"\nnew bookings on different cars, `serve` with default workers, {a.connections} clients")
        print(f"{'engine':12} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failures':>9}")
        for engine, (rps, p50, p99, failed) in results.items():
            print(f"{engine:12} {rps:8.0f} {p50:8.2f} {p99:8.2f} {failed:9d}")
        ratio = results["PostgreSQL"][0] / results["SQLite file"][0]
        print(f"PostgreSQL / SQLite file: {ratio:.2f}")
        failed = sum(figures[3] for figures in results.values())
        print("throughput: no request failed" if not failed else f"throughput: {failed} requests failed")
        return 1 if failed else 0
    try:
        runs = [(s, w) for s in ("waitress", "gunicorn", "granian") for w in (1, cores)] if a.compare else \
            [("serve", None), ("serve", 1)]
        if a.compare:
            missing = [name for name in ("gunicorn", "granian") if shutil.which(name) is None
                       and subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True).returncode]
            if missing:
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *missing], check=True)
        results = {}
        for server, workers in runs:
            label = f"{server} --workers {workers}" if server == "serve" and workers else \
                f"{server} (default workers: {cores})" if server == "serve" else f"{server}, {workers} worker(s)"
            results[server, workers] = measure(server, workers, a, folder)
            report(label, results[server, workers])
            problems += [f"{label}: {kind} had {f[0][3] + f[1][3]} failed requests"
                         for kind, f in results[server, workers].items() if f[0][3] + f[1][3]]
        if not a.compare:
            default, one = results["serve", None], results["serve", 1]
            print("\ntargets (default workers):")
            figures = [("GET /cars/{id}: default/one worker", default["car"][0][0] / one["car"][0][0], 1.3),
                       ("mix: default/one worker", default["mix"][0][0] / one["mix"][0][0], 1.3),
                       ("GET /cars/{id}: service/bare", default["car"][0][0] / default["car"][1][0], 0.7),
                       ("mix: service/bare", default["mix"][0][0] / default["mix"][1][0], 0.5)]
            for name, value, target in figures:
                print(f"  {name:38} {value:5.2f} (>= {target})")
                if value < target:
                    problems.append(f"{name} is {value:.2f}, below {target}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    for line in problems:
        print("throughput: MISSED " + line)
    print("throughput: every target met" if not problems else "throughput: missed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run(main))
