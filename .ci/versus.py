#!/usr/bin/env python3
"""What a change costs: this checkout's service against another checkout's, request by request, in one process.

    git worktree add ../before <commit>          # the version to compare against
    python .ci/versus.py ../before 2>/dev/null

Loads dealership.py from this checkout and from the other folder as two modules, fills a fresh app of
each in memory through the API with the same cars and bookings, then times the same requests on both,
pair by pair (alternating which goes first), and prints the median of the ratios (this / other): 1.00
is no difference. Requests that use nothing new (GET /cars/{id}, GET /cars, available-cars, a booking
made then cancelled) show what every client pays for a change; absolute times on a shared machine are
noise, the ratios are measured side by side.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

T0 = datetime(2035, 1, 1, tzinfo=timezone.utc)


def load(folder, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "dealership.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def must(response, status):
    if response.status_code != status:
        sys.exit(f"versus: expected {status}, got {response.status_code}: {response.get_data(as_text=True)[:300]}")
    return response


def filled(module, cars, per_car):
    app = module.create_app({"DEALERSHIP_DATABASE": ":memory:", "DEALERSHIP_METRICS": "on"})
    client = app.test_client()
    for n in range(cars):
        must(client.post("/api/v1/cars", json={"brand": "Toyota", "model": "Camry", "year": 2023, "color": "Blue",
                                               "daily_price": 100.0, "vin": f"1HGBH41JXM{n:07d}", "dealer_id": 1}), 201)
    for k in range(per_car):
        for n in range(1, cars + 1):
            start = T0 + timedelta(days=3 * k + (1.5 if n % 2 else 0))
            must(client.post("/api/v1/bookings", json={
                "car_id": n, "customer_name": "Bench", "customer_email": "bench@example.com",
                "start_datetime": start.isoformat(), "end_datetime": (start + timedelta(days=2)).isoformat()}), 201)
    return client


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("other", help="the folder of the other checkout")
    ap.add_argument("--cars", type=int, default=200)
    ap.add_argument("--per-car", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=400)
    a = ap.parse_args()
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours, theirs = filled(load(here, "dealership"), a.cars, a.per_car), \
        filled(load(os.path.abspath(a.other), "dealership_other"), a.cars, a.per_car)
    mid = T0 + timedelta(days=3 * (a.per_car // 2) + 2.05)
    period = {"start_datetime": mid.isoformat(), "end_datetime": (mid + timedelta(days=0.9)).isoformat()}
    far = {"car_id": 1, "customer_name": "Bench", "customer_email": "bench@example.com",
           "start_datetime": (T0 + timedelta(days=365 * 50)).isoformat(),
           "end_datetime": (T0 + timedelta(days=365 * 50, hours=1)).isoformat()}

    def book_and_cancel(client):
        response = must(client.post("/api/v1/bookings", json=far), 201)
        must(client.delete(f"/api/v1/bookings/{response.get_json()['id']}"), 204)

    requests = {"GET /cars/{id}": lambda c: must(c.get("/api/v1/cars/7"), 200),
                "GET /cars": lambda c: must(c.get("/api/v1/cars"), 200),
                "available-cars": lambda c: must(c.get("/api/v1/bookings/available-cars", query_string=period), 200),
                "book, cancel": book_and_cancel}
    print(f"versus {a.other}: {a.cars} cars x {a.per_car} bookings each, in memory, {a.rounds} pairs each")
    print(f"{'request':16} {'this ms':>8} {'other ms':>9} {'this/other':>10}")
    for name, call in requests.items():
        for _ in range(20):
            call(ours), call(theirs)
        ratios, mine, other = [], [], []
        for n in range(a.rounds):
            pair = [(ours, mine), (theirs, other)]
            for client, times in (pair if n % 2 else pair[::-1]):
                start = time.perf_counter()
                call(client)
                times.append(time.perf_counter() - start)
            ratios.append(mine[-1] / other[-1])
        print(f"{name:16} {statistics.median(mine) * 1000:8.3f} {statistics.median(other) * 1000:9.3f} "
              f"{statistics.median(ratios):10.2f}")


if __name__ == "__main__":
    main()
