#!/usr/bin/env python3
"""The planning board in a real browser: headless Chromium, offline, on 127.0.0.1 only.

    python .ci/board_browser.py [--out DIR]

Starts `flask --app dealership serve` with the demo data (DEALERSHIP_DEMO_DATA=1, as the README's
demo does) on a free loopback port and opens /board through chromedriver (W3C WebDriver over HTTP)
with the window 1024, 1280, 1600 and 1920 pixels wide. At each width, from the element positions
the browser laid out:
- every booking and maintenance window the API lists in the board's fortnight has its bar, shown,
  inside its own car's row, starting and ending where its times fall on the day columns (within 2
  pixels);
- on the 7-, 14- and 28-day boards, each day header's left and right edges are those of its day
  column, both in the background grid (its lines and the "today" highlight) and where bars are
  placed in every car's row (within 1 pixel); today's header and highlight are on today's column;
  no day header, car label or bar label is cut (its text fits in its box, and a bar's label stays
  inside the lane).
Screenshots are kept in DIR, and their place printed, only when --out is given. The server, the
browser and any temporary folder are removed however this exits.
"""
import argparse
import os
import sys
from datetime import datetime, timedelta, timezone

from docs_browser import browsing, http, screenshots, stopped_as_interrupted
from serve import run, serve

WIDTHS = (1024, 1280, 1600, 1920)
HEIGHT = 1000
BOARDS = (14, 7, 28)  # 14 first: the default board, the one whose bars are checked
EDGE = 1  # pixels a day header may be off its column
SHOWN = 60  # problems printed

# One round trip per page: the boxes of the day headers, the grid's day cells, the lanes where bars
# are placed, and whether the text of each label (day header, car, bar) fits in its box.
LAYOUT = """
const box = e => { const r = e.getBoundingClientRect(); return {left: r.left, right: r.right}; };
const fits = e => ({text: e.textContent.trim(), wide: e.scrollWidth, width: e.clientWidth,
                    tall: e.scrollHeight, height: e.clientHeight});
const all = css => [...document.querySelectorAll(css)];
return {
  viewport: window.innerWidth,
  heads: all('.head .day').map(e => ({...box(e), ...fits(e), today: e.classList.contains('today')})),
  cells: all('.grid .cell').map(e => ({...box(e), today: e.classList.contains('today')})),
  lanes: all('.row .lane').map(e => ({...box(e), car: e.parentElement.dataset.carId || 'head'})),
  cars: all('.row[data-car-id] .car').map(fits),
  bars: all('.bar').map(e => {
    const label = e.querySelector('.label') || e, lane = e.closest('.lane');
    return {...fits(label), ...box(label), lane: box(lane), id: e.dataset.bookingId || 'w' + e.dataset.windowId};
  }),
};
"""


def rect(browser, element):
    return browser.call("GET", f"/element/{element}/rect")


def check_bars(browser, width, expected, first, period):
    """Each entry of the fortnight drawn in its car's row where its times fall: a list of problems."""
    problems = []
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
        print(f"board {width}px: {kind} {entry_id} of car {car_id}: x {box['x']:.0f} to {box['x'] + box['width']:.0f}"
              f" (expected {where[0]:.0f} to {where[1]:.0f}), y {box['y']:.0f} in row {row['y']:.0f}"
              f" to {row['y'] + row['height']:.0f}")
        if not shown:
            problems.append(f"{width}px: {kind} {entry_id} is not displayed")
        if not (row["y"] <= box["y"] and box["y"] + box["height"] <= row["y"] + row["height"]):
            problems.append(f"{width}px: {kind} {entry_id} is not inside the row of car {car_id}")
        if abs(box["x"] - where[0]) > 2 or abs(box["x"] + box["width"] - where[1]) > 2:
            problems.append(f"{width}px: {kind} {entry_id} is drawn from {box['x']:.0f} to "
                            f"{box['x'] + box['width']:.0f}, not {where[0]:.0f} to {where[1]:.0f}")
    return problems


def cut(item):
    """Whether a label's text overflows its box (it is then clipped or ellipsized)."""
    return item["wide"] > item["width"] or item["tall"] > item["height"]


def check_layout(layout, where, days, today_index):
    """Day headers on their columns, today marked on its own, no label cut: a list of problems."""
    problems = []
    heads, cells, lanes = layout["heads"], layout["cells"], layout["lanes"]
    if len(heads) != days or len(cells) != days:
        return [f"{where}: {len(heads)} day headers and {len(cells)} grid columns for {days} days"]
    head_lane = next(lane for lane in lanes if lane["car"] == "head")
    for lane in lanes:  # bars are placed in percent of their row's lane: every lane must be the head's
        if abs(lane["left"] - head_lane["left"]) > EDGE or abs(lane["right"] - head_lane["right"]) > EDGE:
            problems.append(f"{where}: the lane of car {lane['car']} spans {lane['left']:.1f} to "
                            f"{lane['right']:.1f}, the day headers {head_lane['left']:.1f} to {head_lane['right']:.1f}")
    span = head_lane["right"] - head_lane["left"]
    worst = 0
    for n, (head, cell) in enumerate(zip(heads, cells)):
        column = (head_lane["left"] + span * n / days, head_lane["left"] + span * (n + 1) / days)
        for name, edges in (("its grid column", (cell["left"], cell["right"])), ("its column in the rows", column)):
            off = max(abs(head["left"] - edges[0]), abs(head["right"] - edges[1]))
            worst = max(worst, off)
            if off > EDGE:
                problems.append(f"{where}: day header {head['text']!r} spans {head['left']:.1f} to {head['right']:.1f}, "
                                f"{name} {edges[0]:.1f} to {edges[1]:.1f} ({off:.1f} px off)")
        if cut(head):
            problems.append(f"{where}: day header {head['text']!r} is cut: its text needs {head['wide']} x "
                            f"{head['tall']} px, its box has {head['width']} x {head['height']}")
    marked = ([n for n, head in enumerate(heads) if head["today"]], [n for n, cell in enumerate(cells) if cell["today"]])
    expected = [today_index] if 0 <= today_index < days else []
    if marked != (expected, expected):
        problems.append(f"{where}: today is column {expected}, but the headers mark {marked[0]} and the grid {marked[1]}")
    elif expected:  # the highlight down the board and today's header: one column
        head, cell = heads[today_index], cells[today_index]
        if abs(head["left"] - cell["left"]) > EDGE or abs(head["right"] - cell["right"]) > EDGE:
            problems.append(f"{where}: today's highlight spans {cell['left']:.1f} to {cell['right']:.1f}, "
                            f"today's header {head['left']:.1f} to {head['right']:.1f}")
    for car in layout["cars"]:
        if cut(car):
            problems.append(f"{where}: car label {car['text']!r} is cut: its text needs {car['wide']} x "
                            f"{car['tall']} px, its box has {car['width']} x {car['height']}")
    for bar in layout["bars"]:
        if cut(bar) or bar["left"] < bar["lane"]["left"] - EDGE or bar["right"] > bar["lane"]["right"] + EDGE:
            problems.append(f"{where}: the label {bar['text']!r} of bar {bar['id']} is cut: its text needs "
                            f"{bar['wide']} px, its box has {bar['width']}, from {bar['left']:.1f} to "
                            f"{bar['right']:.1f} in a lane from {bar['lane']['left']:.1f} to {bar['lane']['right']:.1f}")
    print(f"{where}: {days} day headers at most {worst:.1f} px off their columns; "
          f"{sum(map(cut, heads))} day headers, {sum(map(cut, layout['cars']))} car labels and "
          f"{sum(1 for p in problems if 'the label' in p)} bar labels cut")
    return problems


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
        for width in WIDTHS:
            browser.call("POST", "/window/rect", {"width": width, "height": HEIGHT})
            for days in BOARDS:
                browser.call("POST", "/url", {"url": f"{base}/board?days={days}"})
                layout = browser.call("POST", "/execute/sync", {"script": LAYOUT, "args": []})
                where = f"board {width}px, {days} days"
                if abs(layout["viewport"] - width) > 20:
                    problems.append(f"{where}: the window is {layout['viewport']} px wide inside, not about {width}")
                browser.screenshot(os.path.join(out, f"board-{days}d-{width}.png"))
                problems += check_layout(layout, where, days, (today - first).days)
                if days == 14:
                    problems += check_bars(browser, width, expected, first, period)
    if not any(datetime.fromisoformat(e) > first and datetime.fromisoformat(s) < first + period
               for _, _, _, s, e in expected):
        problems.append("the demo data has nothing in the board's fortnight")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="keep the screenshots in this folder (by default they are not kept)")
    a = ap.parse_args()
    stopped_as_interrupted()
    with screenshots(a.out, "dealership-board-") as out, serve(env={"DEALERSHIP_DEMO_DATA": "1"}, command="serve") as (base, _):
        problems = check(base, out)
    if a.out is not None:
        print(f"board: screenshots in {a.out}: board-<days>d-<width>.png")
    for line in problems[:SHOWN]:
        print("board: FAIL " + line)
    if len(problems) > SHOWN:
        print(f"board: FAIL ... and {len(problems) - SHOWN} more")
    print("board: passed" if not problems else f"board: failed with {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(run(main))  # the server log kept only when the check fails
