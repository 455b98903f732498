#!/usr/bin/env python3
"""How long the planning board takes to render, against GET /api/v1/cars on the same store.

    python .ci/board_bench.py 2>/dev/null

Fills a fresh in-memory app through the API with 200 cars and 5,000 bookings inside one 28-day
period (25 a car, two 20-hour bookings every 2 days or so), then times GET /board?days=28 for that
period and GET /api/v1/cars in turn, pair by pair over --rounds, as .ci/bench.py does: the median of
the pair ratios is the figure (target <= 10).
"""
import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.getcwd())
from dealership import create_app  # noqa: E402

FIRST = datetime(2035, 1, 1, tzinfo=timezone.utc)  # a Monday


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cars", type=int, default=200)
    ap.add_argument("--per-car", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    client = create_app({"DEALERSHIP_DATABASE": ":memory:"}).test_client()
    step = timedelta(days=28) / a.per_car
    for n in range(a.cars):
        car = client.post("/api/v1/cars", json={"brand": "Toyota", "model": "Corolla", "year": 2024, "color": "White",
                                                "daily_price": 59.9, "vin": f"JTDBR32E7{n:08d}", "dealer_id": 1})
        car_id = car.get_json()["id"]
        for k in range(a.per_car):
            start = FIRST + step * k
            response = client.post("/api/v1/bookings", json={
                "car_id": car_id, "customer_name": "Ada", "customer_email": "ada@example.com",
                "start_datetime": start.isoformat(), "end_datetime": (start + step * 0.8).isoformat()})
            assert response.status_code == 201, response.get_json()
    board_url = f"/board?days=28&start={FIRST.date().isoformat()}"
    page = client.get(board_url).get_data(as_text=True)
    bars = page.count("data-booking-id=")
    times = {"board": [], "cars": []}
    ratios = []
    for _ in range(a.rounds + 3):
        pair = []
        for name, url in (("board", board_url), ("cars", "/api/v1/cars")):
            t = time.perf_counter()
            assert client.get(url).status_code == 200
            pair.append(time.perf_counter() - t)
            times[name].append(pair[-1])
        ratios.append(pair[0] / pair[1])
    ratios, board, cars = ratios[3:], statistics.median(times["board"][3:]), statistics.median(times["cars"][3:])
    ratio = statistics.median(ratios)
    print(f"store: {a.cars} cars, {a.cars * a.per_car} bookings; the board shows {bars} bars, {len(page)} characters")
    print(f"board {board * 1000:.2f} ms, GET /api/v1/cars {cars * 1000:.3f} ms: board/cars {ratio:.1f} (target <= 10)")
    return 0 if ratio <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
