#!/usr/bin/env python3
"""Contract fuzz run: schemathesis against the production server on 127.0.0.1, every check on.

    python .ci/fuzz.py [--max-examples 100] [-- more schemathesis options]

Starts waitress (as the README says) with an API key on a free loopback port, so that the document
declares bearer auth and the `ignored_auth` check can prove writes without the key are refused; then
runs `schemathesis run /openapi.json --checks all` with at least --max-examples cases per operation
in every phase, and the hook in .ci/fuzz_hooks.py for the rules JSON Schema cannot state. Before the
run it creates records through the API (a dealer, cars, bookings a week and more ahead, maintenance
windows), whose ids the hook puts in most requests that name a record, so that the fuzzer reaches
what lies behind an id and not only the 404 of an unknown one. Exits non-zero on any failure; the
server is stopped however this exits, and its log removed unless the run failed (then its path is
printed).
"""
import argparse
import json
import os
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone

from serve import run, serve

KEY = "fuzz-key-0123456789"
CARS, BOOKINGS_PER_CAR = 8, 3


def post(base, path, body):
    request = urllib.request.Request(f"{base}/api/v1{path}", json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)["id"]


def seed(base):
    """Records for the fuzzer to reach: {"dealers": [...], "cars": [...], "bookings": [...],
    "windows": [[car_id, window_id], ...]}; the bookings and windows a week and more ahead, one
    hour each, a day apart, so none overlaps another."""
    dealer = post(base, "/dealers", {"name": "Fuzz Motors", "location": "Loopback", "turnaround_minutes": 30})
    week = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(days=7)
    records = {"dealers": [dealer], "cars": [], "bookings": [], "windows": []}
    for n in range(CARS):
        car = post(base, "/cars", {"brand": "Fuzz", "model": f"Seed {n}", "year": 2024, "color": "Blue",
                                   "daily_price": 80.0 + n, "vin": f"FZSEED{n:011d}", "dealer_id": dealer})
        records["cars"].append(car)
        for k in range(BOOKINGS_PER_CAR + 1):
            start = week + timedelta(days=k, hours=n)
            period = {"start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=1)).isoformat()}
            if k < BOOKINGS_PER_CAR:
                records["bookings"].append(post(base, "/bookings", {
                    "car_id": car, "customer_name": f"Fuzz Customer {n}.{k}", "customer_email": "fuzz@example.com",
                    **period}))
            else:
                records["windows"].append([car, post(base, f"/cars/{car}/maintenance-windows",
                                                     {"note": "seeded", **period})])
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-examples", type=int, default=100)
    ap.add_argument("extra", nargs="*", help="more schemathesis options, after --: -- --report har")
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    # The fuzzer sends many requests without the key on purpose: it must not be throttled for them.
    env = {"DEALERSHIP_API_KEY": KEY, "DEALERSHIP_REFUSED_KEY_LIMIT": "1000000/minute"}
    with serve(threads=4, env=env) as (base, server):
        records = seed(base)
        print(f"fuzz: seeded {', '.join(f'{len(ids)} {kind}' for kind, ids in records.items())}", flush=True)
        fuzz_env = os.environ | {"SCHEMATHESIS_HOOKS": "fuzz_hooks",
                                 "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
                                 "FUZZ_BASE_URL": base, "FUZZ_API_KEY": KEY, "FUZZ_RECORDS": json.dumps(records)}
        command = ["schemathesis", "run", f"{base}/openapi.json", "--checks", "all",
                   "--max-examples", str(a.max_examples), "--header", f"Authorization: Bearer {KEY}",
                   "--request-timeout", "10", "--no-color", *a.extra]
        print("fuzz: " + " ".join(command).replace(KEY, "<key>"), flush=True)
        result = subprocess.run(command, env=fuzz_env, timeout=1800)
        if server.poll() is not None:
            print(f"fuzz: the server died during the run ({server.returncode})")
            return 1
    print("fuzz: passed" if result.returncode == 0 else f"fuzz: failed ({result.returncode})")
    return result.returncode


if __name__ == "__main__":
    sys.exit(run(main))
