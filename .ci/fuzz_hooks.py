"""Schemathesis hook for the contract fuzz run (.ci/fuzz.py): rules JSON Schema cannot state.

The OpenAPI document states each field on its own. Two rules span fields or stored state, and the
document's description states them in words: `end_datetime` must be after `start_datetime`, and a
date-time must be writable in UTC (year 1 with a positive offset, or year 9999 with a negative one,
is not); and a booking may not start in the past. So that the requests the fuzzer sends as valid are
valid, this hook orders each pair of date-times it is about to send, keeps each inside that range,
and moves the start of a booking or maintenance window it writes to tomorrow if it was earlier. A
slot search's duration outside 15 minutes to 90 days (a bound no JSON Schema keyword puts on an ISO
8601 duration; the parameter's description states it) is brought to the nearer end, and a calendar
feed's period within its bounds (400 days at most; a start alone gets an end). An e-mail address whose
domain is a special-use name (.test, .local, .invalid...; email-validator refuses them, as mail cannot
go there) gets .com instead, in a body or a query. And since a PATCH of a booking is
checked once merged with the stored booking, which the fuzzer cannot see, it drops a lone start or
end from such a PATCH. Schemathesis re-judges each case after the hook, so a request that is still
invalid is still tested as invalid.

Three headers and one parameter carry stored state the document can only describe: an
Idempotency-Key used before for another request is a 422, so each case gets a key of its own; an
If-Match that is not the record's current ETag is a 412, so the hook sends the current one (read just
before) or `*`; a change-feed cursor the log does not hold is a 410, so `since` becomes a cursor the
feed gave; and a hold is a fresh one made for the case (a confirm or a delete uses it up), its start
moved to tomorrow as a booking's is. The unit tests cover each refusal.

One more rule is about stored state: a body that names a car or dealer that does not exist is a 404
(the core issue's rule). On an update of a car or booking that the stateful phase just created, the
fuzzer's `ensure_resource_availability` check reads that 404 as "the resource I created is gone". So
on those updates the hook leaves out the reference (`dealer_id` of a car, `car_id` of a booking);
the unit tests cover moving a car or a booking. Every check stays on.

Real ids: a random id names nothing, so a fuzzer left to itself learns that /bookings/{booking_id}
answers 404 and seldom reaches the code behind it. .ci/fuzz.py creates records through the API
before the run (a dealer, cars, bookings a week and more ahead, maintenance windows) and passes
their ids here (FUZZ_RECORDS, with FUZZ_BASE_URL and FUZZ_API_KEY). Outside the stateful phase,
whose links carry ids the run created itself, the hook puts an existing id in place of a generated
one four times in five: in the path (a window together with its own car), in a body's reference
of a new record (the car of a booking, the dealer of a car) and in a query's filter. The fifth keeps the generated
id, so unknown ids are still tried. Which cases keep theirs follows from the generated values, so a
case sent again is treated alike. An id is checked against the live API just before it is used and
its record made again if the run removed it; a DELETE gets a record made for it there and then, so
the deletes never use up the records the other operations need.
"""
import atexit
import json
import os
import random
import re
import sys
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone

import email_validator
import requests
import schemathesis
from schemathesis.generation.meta import CoverageScenario, TestPhase

PAIR = ("start_datetime", "end_datetime")
IN_RANGE = datetime(2035, 1, 1, tzinfo=timezone.utc)
SOON = datetime.now(timezone.utc) + timedelta(days=1)


def instant(value):
    """The instant a value names (IN_RANGE if UTC cannot write it), or None if it is no date-time."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    try:
        return moment.astimezone(timezone.utc)
    except OverflowError:
        return IN_RANGE


def in_order(data):
    """Put each generated pair of date-times (a period, or a slot search's after and before) in
    range and in order, in place."""
    if not isinstance(data, dict):
        return
    for first, last in (PAIR, ("after", "before")):
        moments = {key: instant(data.get(key)) for key in (first, last)}
        for key, moment in moments.items():
            if moment is not None:
                data[key] = moment.isoformat()
        start, end = moments[first], moments[last]
        if start is not None and end is not None and end <= start:
            data[first], data[last] = end.isoformat(), (start + timedelta(seconds=1)).isoformat()


def not_past(data):
    """Move a booking's start (and its end, if need be) to tomorrow if it is earlier, in place."""
    start, end = (instant(data.get(key)) for key in PAIR)
    if start is not None and start < SOON:
        data["start_datetime"] = SOON.isoformat()
        if end is not None and end <= SOON:
            data["end_datetime"] = (SOON + timedelta(hours=1)).isoformat()


def mailable(data):
    """Give a generated e-mail address on a special-use domain an ordinary one, in place."""
    if isinstance(data, dict) and isinstance(data.get("customer_email"), str):
        local, at, domain = data["customer_email"].rpartition("@")
        head, dot, last = domain.rpartition(".")
        if at and last.lower() in email_validator.SPECIAL_USE_DOMAIN_NAMES:
            data["customer_email"] = f"{local}@{head + dot if dot else domain + '.'}com"


FEED_DAYS = 400  # the longest period a calendar feed covers (MAX_FEED_PERIOD)


def feed_period(query):
    """A feed's period (whose default ends 365 days from today, and which may be 400 days at most,
    rules the document states in words) brought within them, in place: a start alone gets an end
    30 days on, an end alone a start 30 days before, and a longer period is cut to 400 days."""
    if not isinstance(query, dict):
        return
    start, end = (instant(query.get(key)) for key in PAIR)
    if start is not None and end is None:
        end = min(start + timedelta(days=30), datetime(9998, 1, 1, tzinfo=timezone.utc))
    elif end is not None and start is None:
        start = max(end - timedelta(days=30), datetime(2, 1, 1, tzinfo=timezone.utc))
    if start is None or end is None:
        return
    end = min(end, start + timedelta(days=FEED_DAYS))
    if end <= start:
        end = start + timedelta(seconds=1)
    query["start_datetime"], query["end_datetime"] = start.isoformat(), end.isoformat()


def slot_length(query):
    """Bring a generated slot duration (ISO 8601, which JSON Schema can match but not bound) into
    15 minutes to 90 days, in place."""
    if not isinstance(query, dict) or not isinstance(query.get("duration"), str):
        return
    units = {"D": 1440, "H": 60, "M": 1}
    minutes = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([DHM])", query["duration"]))
    if re.fullmatch(r"P[0-9DTHM]+", query["duration"]) and not 15 <= minutes <= 90 * 1440:
        query["duration"] = "PT15M" if minutes < 15 else "P90D"


class Live:
    """The records the run keeps reachable, checked against the service when used and made again
    when gone. `records` is what .ci/fuzz.py created: {"dealers": [id], "cars": [id],
    "bookings": [id], "windows": [[car_id, window_id]]}."""

    def __init__(self, base, key, records):
        self.base, self.records, self.made, self.tally = base.rstrip("/"), records, 0, Counter()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"

    def call(self, method, path, body=None):
        response = self.http.request(method, f"{self.base}/api/v1{path}", json=body, timeout=10)
        return response.status_code, (response.json() if response.content and method != "GET" else None)

    def exists(self, path):
        return self.call("GET", path)[0] == 200

    def slot(self, days=8):
        """A fresh hour a week and more ahead, a few hours after the last one given out."""
        self.made += 1
        start = (datetime.now(timezone.utc) + timedelta(days=days, hours=5 * self.made)).replace(microsecond=0)
        return {"start_datetime": start.isoformat(), "end_datetime": (start + timedelta(hours=1)).isoformat()}

    def new(self, kind, car_id=None):
        """Create one record of `kind`; its id (a (car, window) pair for a window), or None."""
        for _ in range(5):
            if kind == "dealers":
                status, body = self.call("POST", "/dealers", {"name": f"Fuzz dealer {self.made}"})
                self.made += 1
            elif kind == "cars":
                self.made += 1
                status, body = self.call("POST", "/cars", {
                    "brand": "Fuzz", "model": "Target", "year": 2024, "color": "Grey", "daily_price": 50.0,
                    "vin": f"FZ{os.getpid() % 100000:05d}{self.made:010d}", "dealer_id": self.dealer()})
            elif kind == "holds":
                status, body = self.call("POST", "/holds", {"car_id": car_id or self.car(), "minutes": 30, **self.slot()})
            elif kind == "bookings":
                status, body = self.call("POST", "/bookings", {
                    "car_id": car_id or self.car(), "customer_name": "Fuzz Target",
                    "customer_email": "fuzz@example.com", **self.slot()})
            else:
                car_id = car_id or self.car()
                status, body = self.call("POST", f"/cars/{car_id}/maintenance-windows", {"note": "fuzz", **self.slot()})
            if status == 201:
                self.tally[f"{kind} made"] += 1
                return [car_id, body["id"]] if kind == "windows" else body["id"]
            car_id = None  # a car in maintenance or fully booked: another one next time
        self.tally[f"{kind} not made"] += 1
        return None

    def pick(self, kind, chooser):
        """One of the kept records of `kind` that still exists (made again if it is gone)."""
        pool = self.records.setdefault(kind, [])
        if pool:
            index = chooser.randrange(len(pool))
            path = {"dealers": "/dealers/{}", "cars": "/cars/{}", "bookings": "/bookings/{}",
                    "windows": "/cars/{}/maintenance-windows/{}"}[kind]
            record = pool[index]
            if self.exists(path.format(*record) if kind == "windows" else path.format(record)):
                return record
            self.tally[f"{kind} gone"] += 1
            made = self.new(kind)
            if made is not None:
                pool[index] = made
            return made
        made = self.new(kind)
        if made is not None:
            pool.append(made)
        return made

    def dealer(self, chooser=random):
        return self.pick("dealers", chooser)

    def car(self, chooser=random):
        return self.pick("cars", chooser)


LIVE = Live(os.environ["FUZZ_BASE_URL"], os.environ.get("FUZZ_API_KEY", ""), json.loads(os.environ["FUZZ_RECORDS"])) \
    if os.environ.get("FUZZ_BASE_URL") else None
REAL_SHARE = 0.8


def an_id(value):
    """The id a generated value names (an int, or digits as the coverage phase writes path values),
    or None if it is no valid id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and value.isascii() and value.isdigit() and int(value) >= 1:
        return int(value)
    return None


def chooser_for(case, values):
    """A random source seeded by the generated values: the same case makes the same choices."""
    return random.Random(f"{case.method} {case.path} {values!r}")


def same_form(old, new):
    return str(new) if isinstance(old, str) else new


def real_path_ids(case, chooser):
    """Existing ids in the path, four times in five. True if the case uses real ids."""
    params = case.path_parameters
    if not isinstance(params, dict) or not any(an_id(params.get(k)) for k in ID_NAMES):
        return False
    if any(k in params and an_id(params[k]) is None for k in ID_NAMES) or chooser.random() >= REAL_SHARE:
        return False  # an invalid id stays, to be refused; one case in five keeps its generated id
    delete = case.method.upper() == "DELETE"
    if "window_id" in params:
        pair = LIVE.new("windows") if delete else LIVE.pick("windows", chooser)
        if pair is None:
            return False
        params["car_id"], params["window_id"] = (same_form(params[k], v) for k, v in zip(("car_id", "window_id"), pair))
    else:
        name = next(k for k in ID_NAMES if k in params)
        kind = {"dealer_id": "dealers", "car_id": "cars", "booking_id": "bookings", "hold_id": "holds"}[name]
        delete = delete or kind == "holds"  # a hold is made for each case: a confirm uses it up
        # a DELETE of a car needs one without bookings, which a new car is
        found = LIVE.new(kind) if delete else LIVE.pick(kind, chooser)
        if found is None:
            return False
        params[name] = same_form(params[name], found)
    LIVE.tally["path ids replaced"] += 1
    return True


def real_references(container, chooser, where):
    """Existing ids for a body's or a query's car_id and dealer_id, four times in five."""
    if not isinstance(container, dict):
        return
    for name, kind in (("car_id", "cars"), ("dealer_id", "dealers")):
        if an_id(container.get(name)) is not None and chooser.random() < REAL_SHARE:
            found = LIVE.pick(kind, chooser)
            if found is not None:
                container[name] = same_form(container[name], found)
                LIVE.tally[f"{where} ids replaced"] += 1


ID_NAMES = ("dealer_id", "car_id", "booking_id", "window_id", "hold_id")


def stateful_headers(case):
    """A fresh Idempotency-Key; an If-Match of the record's current ETag (or `*`); a feed cursor the feed gave."""
    data = getattr(case.meta.phase, "data", None) if case.meta is not None else None
    if getattr(data, "scenario", None) == CoverageScenario.MISSING_PARAMETER:
        return  # a case that leaves out a header (the API key) on purpose: changed, it would be judged anew
    headers = case.headers if case.headers is not None else {}  # a case-insensitive mapping
    if "Idempotency-Key" in headers:
        headers["Idempotency-Key"] = f"fuzz-{uuid.uuid4()}"
    if "If-Match" in headers and LIVE is not None:
        path = case.formatted_path.removeprefix("/api/v1")
        response = LIVE.http.get(f"{LIVE.base}/api/v1{path}", timeout=10)
        etag = response.headers.get("ETag")
        headers["If-Match"] = etag if etag and random.random() < 0.8 else "*"
    if isinstance(case.query, dict) and "since" in case.query and LIVE is not None:
        page = LIVE.http.get(f"{LIVE.base}/api/v1/changes", params={"limit": 50}, timeout=10).json()
        cursors = [change["cursor"] for change in page["changes"]] + [page["next"]]
        case.query["since"] = random.choice(cursors)


def real_ids(case):
    if LIVE is None or case.meta is None or case.meta.phase.name == TestPhase.STATEFUL:
        return
    LIVE.tally["calls"] += 1
    chooser = chooser_for(case, (case.path_parameters, case.query, case.body))
    real_path_ids(case, chooser)
    if case.method.upper() == "POST":  # an update's references are left out below
        real_references(case.body, chooser, "body")
    real_references(case.query, chooser, "query")


@atexit.register
def report():
    if LIVE is not None:
        print("fuzz hooks: " + ", ".join(f"{name} {n}" for name, n in sorted(LIVE.tally.items())), file=sys.stderr)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    real_ids(case)
    in_order(case.query)
    in_order(case.body)
    mailable(case.query)
    mailable(case.body)
    stateful_headers(case)
    if ("/bookings" in case.path or "/maintenance-windows" in case.path or case.path.endswith("/holds")) and \
            case.method.upper() in ("POST", "PATCH") and isinstance(case.body, dict):
        not_past(case.body)
    slot_length(case.query)
    if case.path.endswith("/calendar.ics"):
        feed_period(case.query)
    if case.method.upper() not in ("PUT", "PATCH") or not isinstance(case.body, dict):
        return
    if "booking_id" in case.path:
        case.body.pop("car_id", None)
        if sum(key in case.body for key in PAIR) == 1:
            for key in PAIR:
                case.body.pop(key, None)
    elif "car_id" in case.path:
        case.body.pop("dealer_id", None)
