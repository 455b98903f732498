"""Schemathesis hook for the contract fuzz run (.ci/fuzz.py): rules JSON Schema cannot state.

The OpenAPI document states each field on its own. Two rules span fields or stored state, and the
document's description states them in words: `end_datetime` must be after `start_datetime`, and a
date-time must be writable in UTC (year 1 with a positive offset, or year 9999 with a negative one,
is not); and a booking may not start in the past. So that the requests the fuzzer sends as valid are
valid, this hook orders each pair of date-times it is about to send, keeps each inside that range,
and moves the start of a booking or maintenance window it writes to tomorrow if it was earlier. A
slot search's duration outside 15 minutes to 90 days (a bound no JSON Schema keyword puts on an ISO
8601 duration; the parameter's description states it) is brought to the nearer end. An e-mail address whose
domain is a special-use name (.test, .local, .invalid...; email-validator refuses them, as mail cannot
go there) gets .com instead, in a body or a query. And since a PATCH of a booking is
checked once merged with the stored booking, which the fuzzer cannot see, it drops a lone start or
end from such a PATCH. Schemathesis re-judges each case after the hook, so a request that is still
invalid is still tested as invalid.

One more rule is about stored state: a body that names a car or dealer that does not exist is a 404
(the core issue's rule). On an update of a car or booking that the stateful phase just created, the
fuzzer's `ensure_resource_availability` check reads that 404 as "the resource I created is gone". So
on those updates the hook leaves out the reference (`dealer_id` of a car, `car_id` of a booking);
the unit tests cover moving a car or a booking. Every check stays on.
"""
import re
from datetime import datetime, timedelta, timezone

import email_validator
import schemathesis

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


def slot_length(query):
    """Bring a generated slot duration (ISO 8601, which JSON Schema can match but not bound) into
    15 minutes to 90 days, in place."""
    if not isinstance(query, dict) or not isinstance(query.get("duration"), str):
        return
    units = {"D": 1440, "H": 60, "M": 1}
    minutes = sum(int(n) * units[u] for n, u in re.findall(r"(\d+)([DHM])", query["duration"]))
    if re.fullmatch(r"P[0-9DTHM]+", query["duration"]) and not 15 <= minutes <= 90 * 1440:
        query["duration"] = "PT15M" if minutes < 15 else "P90D"


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    in_order(case.query)
    in_order(case.body)
    mailable(case.query)
    mailable(case.body)
    if ("/bookings" in case.path or "/maintenance-windows" in case.path) and \
            case.method.upper() in ("POST", "PATCH") and isinstance(case.body, dict):
        not_past(case.body)
    slot_length(case.query)
    if case.method.upper() not in ("PUT", "PATCH") or not isinstance(case.body, dict):
        return
    if "booking_id" in case.path:
        case.body.pop("car_id", None)
        if sum(key in case.body for key in PAIR) == 1:
            for key in PAIR:
                case.body.pop(key, None)
    elif "car_id" in case.path:
        case.body.pop("dealer_id", None)
