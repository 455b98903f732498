#!/usr/bin/env python3
"""The planning board in a real browser: headless Chromium, offline, on 127.0.0.1 only.

    python .ci/board_browser.py [--out DIR]

Starts `flask --app dealership serve` with the demo data (DEALERSHIP_DEMO_DATA=1, as the README's
demo does) on a free loopback port, opens /board through chromedriver (W3C WebDriver over HTTP),
and, for every booking and maintenance window the API lists in the board's fortnight, finds its bar
and checks from the element positions the browser laid out that it is shown, inside its own car's
row, and starts and ends where its times fall on the day columns (within 2 pixels). Keeps a
screenshot, and prints where, only when --out is given. The server and the browser are stopped, and
any temporary folder removed, however this exits.
"""
import argparse
import os
import sys
from datetime import datetime, timedelta, timezone

from docs_browser import browsing, http, screenshots, stopped_as_interrupted
from serve import serve


def rect(browser, element):
    return browser.call("GET", f"/element/{element}/rect")


def check(base, out):
    """What is wrong with the board at `base`, as a list of lines (empty when all is well)."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=today.weekday())  # the board's default: Monday of this week, 14 days
    period = timedelta(days=14)
    bookings = http("GET", f"{base}/api/v1/bookings")
    expected = [("booking", b["id"], b["car_id"], b["start_datetime"], b["end_datetime"]) for b in bookings]
    for car in http("GET", f"{base}/api/v1/cars"):
        expected += [("window", w["id"], car["id"], w["start_datetime"], w["end_datetime"])
                     for w in http("GET", f"{base}/api/v1/cars/{car['id']}/maintenance-windows")]
    problems = []
    with browsing() as browser:
        browser.call("POST", "/url", {"url": f"{base}/board"})
        browser.screenshot(os.path.join(out, "board.png"))
        for kind, entry_id, car_id, start, end in expected:
            start, end = datetime.fromisoformat(start), datetime.fromisoformat(end)
            if end <= first or start >= first + period:
                continue
            bar = browser.find(f'.bar[data-{kind}-id="{entry_id}"]')
            lane = rect(browser, browser.find(f'.row[data-car-id="{car_id}"] .lane'))
            row = rect(browser, browser.find(f'.row[data-car-id="{car_id}"]'))
            box = rect(browser, bar)
            where = [lane["x"] + lane["width"] * min(max((t - first) / period, 0), 1) for t in (start, end)]
            shown = browser.call("GET", f"/element/{bar}/displayed")
            print(f"board: {kind} {entry_id} of car {car_id}: x {box['x']:.0f} to {box['x'] + box['width']:.0f}"
                  f" (expected {where[0]:.0f} to {where[1]:.0f}), y {box['y']:.0f} in row {row['y']:.0f}"
                  f" to {row['y'] + row['height']:.0f}")
            if not shown:
                problems.append(f"{kind} {entry_id} is not displayed")
            if not (row["y"] <= box["y"] and box["y"] + box["height"] <= row["y"] + row["height"]):
                problems.append(f"{kind} {entry_id} is not inside the row of car {car_id}")
            if abs(box["x"] - where[0]) > 2 or abs(box["x"] + box["width"] - where[1]) > 2:
                problems.append(f"{kind} {entry_id} is drawn from {box['x']:.0f} to "
                                f"{box['x'] + box['width']:.0f}, not {where[0]:.0f} to {where[1]:.0f}")
    if not any(datetime.fromisoformat(e) > first and datetime.fromisoformat(s) < first + period
               for _, _, _, s, e in expected):
        problems.append("the demo data has nothing in the board's fortnight")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="keep the screenshot in this folder (by default it is not kept)")
    a = ap.parse_args()
    stopped_as_interrupted()
    with screenshots(a.out, "dealership-board-") as out, serve(env={"DEALERSHIP_DEMO_DATA": "1"}, command="serve") as (base, _):
        problems = check(base, out)
    if a.out is not None:
        print(f"board: screenshot in {a.out}: board.png")
    for line in problems:
        print("board: FAIL " + line)
    print("board: passed" if not problems else "board: failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
