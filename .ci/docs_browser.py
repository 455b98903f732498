#!/usr/bin/env python3
"""The interactive docs in a real browser: headless Chromium, offline, on 127.0.0.1 only.

    python .ci/docs_browser.py [--out DIR]

Starts waitress (as the README says) on a free loopback port, then:
1. `chromium --dump-dom /docs`: fails unless Swagger UI rendered one operation block for each
   operation of /openapi.json;
2. drives the page through chromedriver (plain W3C WebDriver over HTTP), as a newcomer would, with
   the examples the page fills in and no typing: opens "POST /api/v1/cars", presses "Try it out"
   and Execute, and reads 201; does the same on "POST /api/v1/bookings", whose example books the car
   just made, and reads 201; then on "available-cars", and reads 200 and a list without that car
   (booked for that very period); and checks through the API that the booking is stored;
3. saves screenshots of the page; they are kept, and their place printed, only when --out is given.
Chromium and chromedriver come from Debian's packages (`chromium`, `chromium-driver`); .ci/run
installs them when missing. The server and the browser are stopped, and any temporary folder
removed, however this exits.
"""
import argparse
import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

from serve import HOST, free_port, run, serve, stop, wait_for

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


def http(method, url, body=None, timeout=30):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        payload = response.read()
        return json.loads(payload) if payload else None


class Browser:
    """A minimal WebDriver client: just what a user of the docs page does."""

    def __init__(self, driver_url, profile):
        options = {"binary": "/usr/bin/chromium", "args": CHROMIUM_FLAGS + ["--window-size=1280,2000",
                                                                           f"--user-data-dir={profile}"]}
        session = http("POST", f"{driver_url}/session",
                       {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}})
        self.url = f"{driver_url}/session/{session['value']['sessionId']}"
        self.call("POST", "/timeouts", {"implicit": 10000, "pageLoad": 30000})

    def call(self, method, path, body=None):
        return http(method, self.url + path, body if body is not None or method != "POST" else {})["value"]

    def find(self, css):
        return self.call("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css):
        self.call("POST", f"/element/{self.find(css)}/click")

    def type(self, css, text):
        element = self.find(css)
        self.call("POST", f"/element/{element}/clear")
        self.call("POST", f"/element/{element}/value", {"text": text})

    def text(self, css, pattern=r"\S", seconds=15):
        """The text of the first element matching css once it matches pattern."""
        deadline = time.monotonic() + seconds
        while True:
            value = self.call("GET", f"/element/{self.find(css)}/text")
            if re.search(pattern, value) or time.monotonic() > deadline:
                return value
            time.sleep(0.2)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.call("GET", "/screenshot")))

    def close(self):
        http("DELETE", self.url)


@contextlib.contextmanager
def browsing():
    """A Browser on a fresh profile, through a chromedriver of its own; both stopped however the block exits."""
    driver_port = free_port()
    driver = subprocess.Popen(["chromedriver", f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(f"http://{HOST}:{driver_port}/status", driver)
        with tempfile.TemporaryDirectory() as profile:
            browser = Browser(f"http://{HOST}:{driver_port}", profile)
            try:
                yield browser
            finally:
                browser.close()
    finally:
        stop(driver)


@contextlib.contextmanager
def screenshots(out, prefix):
    """The folder for screenshots: `out` (made if missing, and kept), or else a temporary one, removed
    however the block exits."""
    if out is not None:
        os.makedirs(out, exist_ok=True)
        yield out
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield folder


def stopped_as_interrupted():
    """SIGTERM (a CI job's timeout) ends the script as Ctrl+C does: servers stopped, folders removed."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def execute(browser, operation):
    """Open an operation on the page, press "Try it out" and Execute, with what the page filled in:
    (status, response text)."""
    block = f"#operations-{operation}"
    browser.click(f"{block} .opblock-summary-control")
    try_it = f"{block} button.try-out__btn"
    if "Try it out" in browser.text(try_it):  # Swagger UI starts some operations read-only
        browser.click(try_it)
    browser.click(f"{block} button.execute")
    status = browser.text(f"{block} .live-responses-table tr.response .response-col_status", r"\d{3}").split()[0]
    payload = browser.text(f"{block} .live-responses-table tr.response .response-col_description pre.microlight")
    return status, payload


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="keep the screenshots in this folder (by default they are not kept)")
    a = ap.parse_args()
    stopped_as_interrupted()
    with screenshots(a.out, "dealership-docs-") as out, serve() as (base, _):
        problems = check(base, out)
    if a.out is not None:
        print(f"docs: screenshots in {a.out}: docs.png, docs-after-booking.png")
    for line in problems:
        print("docs: FAIL " + line)
    print("docs: passed" if not problems else "docs: failed")
    return 1 if problems else 0


def check(base, out):
    """What is wrong with the docs page at `base`, as a list of lines (empty when all is well)."""
    problems = []
    operations = sum(len(ops) for ops in http("GET", f"{base}/openapi.json")["paths"].values())

    # 1. The page renders the operation list.
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                              "--virtual-time-budget=15000", "--dump-dom", f"{base}/docs"],
                             capture_output=True, text=True, timeout=120).stdout
    rendered = len(re.findall(r'class="opblock opblock-(?:get|post|put|patch|delete)', dom))
    print(f"docs: /docs rendered {rendered} operation blocks; /openapi.json has {operations} operations")
    if rendered != operations:
        problems.append(f"expected {operations} operation blocks, saw {rendered}")

    # 2. A user creates a car and books it from the page.
    with browsing() as browser:
        browser.call("POST", "/url", {"url": f"{base}/docs"})
        browser.find(".opblock")
        browser.screenshot(os.path.join(out, "docs.png"))
        status, body = execute(browser, "cars-create_car")
        print(f"docs: POST /api/v1/cars from the page, as filled in, answered {status}")
        car_id = json.loads(body)["id"] if status == "201" else None
        if car_id is None:
            problems.append(f"creating a car from the page answered {status}: {body[:300]}")
        else:
            status, body = execute(browser, "bookings-create_booking")
            print(f"docs: POST /api/v1/bookings from the page, as filled in, answered {status}")
            if status != "201":
                problems.append(f"booking from the page answered {status}: {body[:300]}")
            elif json.loads(body)["car_id"] != car_id:
                problems.append(f"the example booked car {json.loads(body)['car_id']}, not the new car {car_id}")
            stored = http("GET", f"{base}/api/v1/bookings?car_id={car_id}")
            if len(stored) != 1:
                problems.append(f"the booking made from the page is not stored: {stored}")
            status, body = execute(browser, "bookings-available_cars")
            print(f"docs: available-cars from the page, as filled in, answered {status}")
            if status != "200" or car_id in [car["id"] for car in json.loads(body)]:
                problems.append(f"available-cars answered {status}, {body[:300]}, with car {car_id} booked")
        browser.screenshot(os.path.join(out, "docs-after-booking.png"))
    return problems


if __name__ == "__main__":
    sys.exit(run(main))  # the server log kept only when the check fails
