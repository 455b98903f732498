"""Car dealership inventory and booking service: one Flask module.

Dealers own cars; customers book a car for a date-time range, and the service never books one car
twice for overlapping times, nor over a maintenance window, nor within its dealer's turnaround. It
answers "which cars are free between X and Y?", "when is this car busy or free?" and "when is the
earliest I can have one for three days?" as well, prices every booking, draws the fleet on a
planning board (/board) and publishes calendar feeds (.ics).

Run it for a local demo (the interactive docs are then at http://127.0.0.1:5000/docs), and in
production (waitress, one process per core, with limits that follow the service's own):

    flask --app dealership run
    flask --app dealership serve --port 8000

Embed it in a larger Flask app:

    import dealership
    dealership.init_app(app, url_prefix="/api/v1")  # docs_prefix="" also mounts /openapi.json, /docs

Time rules: date-times are RFC 3339. A value with an offset is that instant; a value without one
is local time in DEALERSHIP_TIMEZONE (UTC unless set). Every comparison is between instants, and
responses carry the offset of that zone. Booking intervals are half-open, [start, end): a booking
that ends at 10:00 and one that starts at 10:00 do not overlap. No booking starts in the past.

Settings (DEALERSHIP_TIMEZONE, DEALERSHIP_API_KEY, DEALERSHIP_DATABASE, ...: see SETTINGS) come
from the config mapping given to create_app, or from environment variables of the same names.

Every request is answered from dicts in memory, per app (``app.extensions["dealership"]``); every
change is written first to a SQLite file (DEALERSHIP_DATABASE), which several processes on one
machine may share: each catches up with the others' changes before it answers. Writes that arrive
together share one transaction and one sync to disk (group commit), each answered once it holds.
"""
import bisect
import functools
import hmac
import inspect
import json
import logging
import operator
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import quote as url_quote, urlencode
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click
import email_validator
import icalendar
import flask.logging
import limits
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, current_app, redirect, render_template, request, url_for
from flask.cli import ScriptInfo, with_appcontext
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_swagger_ui import get_swaggerui_blueprint
from markupsafe import Markup, escape
from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from sortedcontainers import SortedList
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import (BadRequest, Conflict, HTTPException, InternalServerError, NotFound,
                                 RequestEntityTooLarge, ServiceUnavailable, Unauthorized, UnsupportedMediaType,
                                 default_exceptions)
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

API_PREFIX = "/api/v1"
API_VERSION = "1.0.0"
EXTENSION = "dealership"
REFUSALS = "dealership_refusals"
# What text may hold, spelled out as regex classes that mean the same to the service (Python) and to
# the ECMA regexes that clients of the OpenAPI document use (and simple enough for fuzzers to generate
# from). A lone surrogate is refused in code as well: it is not a character, and no JSON Schema
# pattern can name it the same way in both dialects.
CONTROLS = r"\u0000-\u001f\u007f-\u009f"  # Unicode category Cc: tab and newline included
SPACES = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # whitespace other than Cc: str.strip()'s
FORMATS = (r"\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
           r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb")  # category Cf below U+FFFF: zero-width, bidi...
CHAR = rf"[^{CONTROLS}]"
VISIBLE = rf"[^{CONTROLS}{SPACES}{FORMATS}]"
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
# 17 characters, any case, surrounding spaces allowed; I, O and Q never occur in a VIN.
VIN_PATTERN = rf"^[{SPACES}]*[A-HJ-NPR-Za-hj-npr-z0-9]{{17}}[{SPACES}]*$"
FIRST_CAR_YEAR = 1886
MIN_DAILY_PRICE = 0.01  # a cent: 5e-324 is no price
MAX_DAILY_PRICE = 1_000_000
CAR_STATUSES = ("available", "maintenance")
MAX_PAGE = 1000
DEFAULT_PAGE = 100  # bookings (a store can hold millions) and slots (one per car) answered without a limit
MAX_ERRORS = 20  # offending fields listed in one 422
MAX_TURNAROUND = 1440  # minutes: a day
MAX_NAME = 200  # characters of a customer's name
MAX_EMAIL = 254  # characters of an e-mail address, once normalized
CLOCK_TOLERANCE = timedelta(minutes=1)  # how far in the past a new booking may start
SEED_DEALER = {"name": "Oscar Mobility Main", "location": "Munich, Germany", "turnaround_minutes": 0}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
URL_PATH_SAFE = "!$&'()*+,/:;=@"  # what Werkzeug leaves unquoted in the path of a URL it builds
log = logging.getLogger("dealership")


class ConfigError(click.ClickException, ValueError):
    """A setting, or a database file, that the service cannot start with.

    A ClickException, so that `flask run` (and any Flask command) prints its one line, not a traceback.
    """

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


# -- reading settings: each from a string (the environment) or a Python value (a config mapping) --


def boolean(name, value):
    if isinstance(value, bool):
        return value
    words = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    if isinstance(value, (str, int)) and str(value).lower() in words:
        return words[str(value).lower()]
    raise ConfigError(f"{name}={value!r} must be one of 1, 0, true, false, yes, no, on, off.")


def whole_number(minimum):
    def read(name, value):
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"{name}={value!r} must be a whole number of at least {minimum}.")
        return value
    return read


def seconds(name, value):
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 <= number <= 3600:
        raise ConfigError(f"{name}={value!r} must be a number of seconds from 0 to 3600.")
    return number


def one_of(*choices):
    def read(name, value):
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}.")
        return value.lower()
    return read


def zone_name(name, value):
    try:
        ZoneInfo(str(value))
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a region folder such as "Europe"
        raise ConfigError(f"{name}={value!r} is not a known time zone: "
                          "use an IANA name such as 'Europe/Berlin' or 'UTC'.") from None
    return str(value)


def text_setting(name, value):
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={value!r} must be a non-empty text.")
    return value


def rate_limit(name, value):
    try:
        limits.parse_many(value)
    except (ValueError, TypeError):
        raise ConfigError(f"{name}={value!r} is not a rate limit: write it as '300/minute' or "
                          "'10/second;300/minute'.") from None
    return value


def currency_code(name, value):
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z]{3}", value):
        raise ConfigError(f"{name}={value!r} must be an ISO 4217 currency code of three letters, such as "
                          "'EUR', 'USD' or 'GBP'.")
    return value.upper()


def optional(read):
    """None or the empty string mean the setting is not set."""
    return lambda name, value: None if value is None or value == "" else read(name, value)


def api_key(name, value):
    """The key as written, never parsed: one that no client could send is refused."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be text, not {type(value).__name__} {value!r}.")
    if value != value.strip() or not all(" " <= c <= "~" for c in value) or len(value) < 16:
        raise ConfigError(f"{name} must be at least 16 printable ASCII characters, with no space or tab at "
                          "either end (it is sent as 'Authorization: Bearer <key>').")
    return value


# Every setting: its default, and how its value is read. create_app reads each from the environment
# as the string it is there (never parsed as JSON), then from its config mapping.
SETTINGS = {
    "DEALERSHIP_TIMEZONE": ("UTC", zone_name),
    "DEALERSHIP_API_KEY": (None, optional(api_key)),
    "DEALERSHIP_MAX_CONTENT_LENGTH": (1024 * 1024, whole_number(1)),
    "DEALERSHIP_DEMO_DATA": (False, boolean),
    "DEALERSHIP_DATABASE": ("dealership.sqlite3", text_setting),  # in the instance folder; ":memory:" for none
    "DEALERSHIP_SYNCHRONOUS": ("full", one_of("full", "normal")),
    "DEALERSHIP_BUSY_TIMEOUT": (5, seconds),
    "DEALERSHIP_RATE_LIMIT": (None, optional(rate_limit)),  # such as "300/minute", per client address
    "DEALERSHIP_REFUSED_KEY_LIMIT": ("10/minute", rate_limit),  # refused API keys per client address, then 429
    "DEALERSHIP_RATELIMIT_STORAGE_URI": ("memory://", text_setting),  # Flask-Limiter's counts: shared, if need be
    "DEALERSHIP_PROXIES": (0, whole_number(0)),  # trusted proxies in front, whose X-Forwarded-For tells the client
    "DEALERSHIP_CURRENCY": ("EUR", currency_code),  # what prices are in: shown beside them, never converted
}


# ---------------------------------------------------------------------------------------------
# Records: immutable, so a reader never sees half an update; a change stores a new record.
# ---------------------------------------------------------------------------------------------



@dataclass(frozen=True, slots=True)
class Dealer:
    id: int
    name: str
    location: str
    turnaround_minutes: int  # the least gap between two entries of the schedule of each of its cars


@dataclass(frozen=True, slots=True)
class Car:
    id: int
    brand: str
    model: str
    year: int
    color: str
    daily_price: float
    vin: str
    status: str
    dealer_id: int
    json: bytes  # the public JSON form, rendered once by CAR_SCHEMA when the record is written


@dataclass(frozen=True, slots=True)
class Booking:
    id: int
    car_id: int
    customer_name: str
    customer_email: str
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC
    total_cents: int  # the price, fixed when the booking is made or moved


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A period in which a car is in the workshop: it sits in the car's schedule beside its bookings."""
    id: int
    car_id: int
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC
    note: str


# ---------------------------------------------------------------------------------------------
# Domain rules: pure functions over half-open intervals [start, end)
# ---------------------------------------------------------------------------------------------


def overlaps(start_a, end_a, start_b, end_b):
    """True when [start_a, end_a) and [start_b, end_b) share at least one instant."""
    return start_a < end_b and start_b < end_a


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)


def micros(instant):
    """An aware instant as integer microseconds since 1970: exact, and the cheapest to compare."""
    return (instant - EPOCH) // MICROSECOND


MINUTE = 60_000_000  # micros
DAY = 24 * 60 * MINUTE


class Schedule:
    """One car's schedule: its bookings and maintenance windows (entries) sorted by start, with their
    starts and ends as integers (micros) beside them.

    Entries never overlap, so sorted by start they are sorted by end too: an overlap check is one
    binary search over plain integers, with no key function and no record touched. A turnaround of
    `pad` micros is checked as an overlap with the range widened by `pad` on both sides.
    """
    __slots__ = ("entries", "starts", "ends")

    def __init__(self):
        self.entries, self.starts, self.ends = [], [], []

    def add(self, entry):
        start = micros(entry.start_datetime)
        i = bisect.bisect_left(self.starts, start)
        self.entries.insert(i, entry)
        self.starts.insert(i, start)
        self.ends.insert(i, micros(entry.end_datetime))

    def remove(self, entry):
        i = bisect.bisect_left(self.starts, micros(entry.start_datetime))
        del self.entries[i], self.starts[i], self.ends[i]

    def near(self, start, end, pad=0):
        """The entries that overlap [start - pad, end + pad) (micros), in time order."""
        return self.entries[bisect.bisect_right(self.ends, start - pad):bisect.bisect_left(self.starts, end + pad)]

    def bookings(self):
        return [entry for entry in self.entries if type(entry) is Booking]

    def windows(self):
        return [entry for entry in self.entries if type(entry) is MaintenanceWindow]


class Coverage:
    """Which cars have something in their schedule on each day (UTC), as bitmasks: Python ints with
    one bit per car, at the car's position (cars in id order; a position is never reused). For each
    day, `touched` has the cars with an entry overlapping it and `covered` those with one entry
    covering all of it; a car with an entry over more than LONG_DAYS days is in `long` instead.

    For a period, a few integer operations over the days it touches then split the fleet: a car not
    touched on those days is surely free, a car covered on one of them surely busy, and only the
    rest need their schedule searched. Kept up to date with every entry added or removed.
    """
    LONG_DAYS = 62  # longer entries are not spread over the days: their cars are always searched
    MAX_DAYS = 62  # a longer period is searched car by car

    def __init__(self, schedules):
        self.position, self.next, self.last_id = {}, 0, 0
        self.touched, self.covered, self.longs, self.long = {}, {}, {}, 0
        self.spots = {}  # (byte index << 8 | byte) -> its positions: see positions()
        for car_id, schedule in schedules.items():
            self.add_car(car_id)
            for start, end in zip(schedule.starts, schedule.ends):
                self.add(car_id, start, end)

    def add_car(self, car_id):
        """Give a new car the next position; False if its id is not the highest yet (then the
        positions would not be in id order, and the coverage must be made again)."""
        if car_id <= self.last_id:
            return False
        self.position[car_id], self.next, self.last_id = self.next, self.next + 1, car_id
        return True

    def drop_car(self, car_id):
        keep = ~(1 << self.position.pop(car_id))
        self.touched = {day: mask & keep for day, mask in self.touched.items() if mask & keep}
        self.covered = {day: mask & keep for day, mask in self.covered.items() if mask & keep}
        self.long &= keep
        self.longs.pop(car_id, None)

    def add(self, car_id, start, end):
        bit = 1 << self.position[car_id]
        first, last = start // DAY, (end - 1) // DAY
        if last - first > self.LONG_DAYS:
            self.longs[car_id] = self.longs.get(car_id, 0) + 1
            self.long |= bit
            return
        for day in range(first, last + 1):
            self.touched[day] = self.touched.get(day, 0) | bit
            if start <= day * DAY and (day + 1) * DAY <= end:
                self.covered[day] = self.covered.get(day, 0) | bit

    def remove(self, car_id, start, end, starts, ends):
        """Take out an entry already removed from the car's schedule (`starts`, `ends`): each day it
        touched is worked out again from what the schedule still holds."""
        bit = 1 << self.position[car_id]
        first, last = start // DAY, (end - 1) // DAY
        if last - first > self.LONG_DAYS:
            self.longs[car_id] -= 1
            if not self.longs[car_id]:
                del self.longs[car_id]
                self.long &= ~bit
            return
        for day in range(first, last + 1):
            low, high = day * DAY, (day + 1) * DAY
            i, j = bisect.bisect_right(ends, low), bisect.bisect_left(starts, high)
            short = [n for n in range(i, j) if (ends[n] - 1) // DAY - starts[n] // DAY <= self.LONG_DAYS]
            for masks, present in ((self.touched, bool(short)),
                                   (self.covered, any(starts[n] <= low and high <= ends[n] for n in short))):
                mask = (masks.get(day, 0) | bit) if present else (masks.get(day, 0) & ~bit)
                if mask:
                    masks[day] = mask
                else:
                    masks.pop(day, None)

    def split(self, low, high):
        """For the period [low, high) (micros): (surely free, to be searched) as masks over every
        position, or None when the period spans too many days to be worth it."""
        first, last = low // DAY, (high - 1) // DAY
        if last - first > self.MAX_DAYS:
            return None
        touched, covered = self.long, 0
        for day in range(first, last + 1):
            touched |= self.touched.get(day, 0)
            covered |= self.covered.get(day, 0)
        return ~touched, touched & ~covered

    def positions(self, mask, stop=None):
        """The set bits of a (non-negative) mask, lowest first (only the first `stop`, if given): byte
        by byte, each byte at each place written out once as its positions and then kept."""
        spots, found = self.spots, []
        if len(spots) > MAX_CHUNKS:
            spots.clear()
        for i, byte in enumerate(mask.to_bytes((mask.bit_length() + 7) // 8, "little")):
            if byte:
                spot = spots.get(i << 8 | byte)
                if spot is None:
                    spot = spots[i << 8 | byte] = tuple(i * 8 + n for n in BITS[byte])
                found += spot
                if stop is not None and len(found) >= stop:
                    break
        return found


BITS = [tuple(n for n in range(8) if byte >> n & 1) for byte in range(256)]  # the set bits of each byte


ID_SPAN = 1 << 63  # ids are below it (SQLite's integer keys are)


def order_key(start, booking_id):
    """One integer that sorts bookings by start, then id: the key of the store's index."""
    return micros(start) * ID_SPAN + booking_id


def check_not_past(start, now, what="booking"):
    """A booking (or window) may not start (or be moved to start) before now, give or take a minute
    for clocks that differ: raised on start_datetime."""
    if start < now - CLOCK_TOLERANCE:
        raise ValidationError(f"Is in the past: a {what} can start from now on "
                              f"({now.replace(microsecond=0).isoformat()}).", field_name="start_datetime")


def free_gaps(entries, start, end, pad=timedelta(0)):
    """The gaps of [start, end) that no entry (sorted, non-overlapping), widened by `pad` on both
    sides, covers: where a booking could go."""
    gaps, cursor = [], start
    for entry in entries:
        if entry.start_datetime - pad > cursor:
            gaps.append((cursor, min(entry.start_datetime - pad, end)))
        cursor = max(cursor, entry.end_datetime + pad)
    if cursor < end:
        gaps.append((cursor, end))
    return gaps


def rental_days(start, end):
    """The number of started 24-hour periods in [start, end): at least one."""
    return max(1, -(-(micros(end) - micros(start)) // DAY))


def price_cents(daily_price, start, end):
    """The price of [start, end): the daily price times the started days, in decimal, rounded to
    whole cents (half up)."""
    total = Decimal(repr(daily_price)) * rental_days(start, end)
    return int((total * 100).quantize(Decimal(1), ROUND_HALF_UP))


# An ISO 8601 duration of days, hours and minutes: P3D, PT4H, P1DT12H, PT90M. (No lookahead, so that
# the OpenAPI document can state it and fuzzers generate from it.)
DURATION_PATTERN = r"^P(?:\d{1,5}D(?:T(?:\d{1,7}H(?:\d{1,9}M)?|\d{1,9}M))?|T(?:\d{1,7}H(?:\d{1,9}M)?|\d{1,9}M))$"
DURATION = re.compile(DURATION_PATTERN)
MIN_SLOT, MAX_SLOT = timedelta(minutes=15), timedelta(days=90)
LATEST_SLOT_END = datetime(9999, 1, 1, tzinfo=timezone.utc)  # far enough from the end of the calendar to be written in any zone


def parse_duration(text):
    """A timedelta from an ISO 8601 duration of days, hours and minutes, or None."""
    if not DURATION.fullmatch(text):
        return None
    units = {"D": "days", "H": "hours", "M": "minutes"}
    return timedelta(**{units[unit]: int(number) for number, unit in re.findall(r"(\d+)([DHM])", text)})


# ---------------------------------------------------------------------------------------------
# The store: the dicts every request reads, and the only code that changes them. A change takes
# SQLite's write lock, catches up with what other processes committed, checks, writes, commits,
# and only then changes the dicts. Readers never wait for the disk or for another process.
# ---------------------------------------------------------------------------------------------


class Job:
    """A write waiting for its turn (see Store._write): the change to make, the cars it reads and
    changes (None: it may read anything, so it runs alone), and once done its result or error.
    `turn`, an Event for a write that waits, is set when it is done or its thread is to run the next batch."""
    __slots__ = ("change", "cars", "result", "error", "done", "turn")

    def __init__(self, change, cars):
        self.change, self.cars, self.result, self.error, self.done, self.turn = change, cars, None, None, False, None

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class Refused(Exception):
    """The one write of a transaction was refused: roll the transaction back."""


MAX_BATCH = 64  # writes in one transaction at most


class Store:
    """Two locks: `lock` guards the dicts (every reader takes it, and every change to them);
    `write_lock` lets one batch of writes of this process at a time use the database's write
    connection (see _write). A write holds `lock` only to check and write its SQL, not while SQLite
    waits for another process or syncs the commit to disk."""

    def __init__(self, database, zone=timezone.utc, currency="EUR"):
        self.zone = zone  # naive input is read in this zone, and output is written in it
        self.currency = currency  # shown beside every price
        self.offer_openings = {}  # car id -> the opening of its slots' JSON (see offers_json)
        self.lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.queue_lock, self.queue, self.leading = threading.Lock(), [], False  # writes waiting: see _write
        self.db = database
        with self.lock:
            self._reload(database.write)

    # -- lookups --------------------------------------------------------------------------------

    def dealer(self, dealer_id):
        try:
            return self.dealers[dealer_id]
        except KeyError:
            raise NotFound(f"There is no dealer with id {dealer_id}.") from None

    def car(self, car_id):
        try:
            return self.cars[car_id]
        except KeyError:
            raise NotFound(f"There is no car with id {car_id}.") from None

    def booking(self, booking_id):
        try:
            return self.bookings[booking_id]
        except KeyError:
            raise NotFound(f"There is no booking with id {booking_id}.") from None

    def window(self, car_id, window_id):
        window = self.windows.get(window_id)
        if window is None or window.car_id != car_id:
            self.car(car_id)
            raise NotFound(f"Car {car_id} has no maintenance window with id {window_id}.")
        return window

    def pad(self, car):
        """The turnaround of a car's dealer, in micros: the least gap around each entry of its schedule."""
        return self.dealers[car.dealer_id].turnaround_minutes * MINUTE

    # -- dealers --------------------------------------------------------------------------------
    # Each write is a function of (the write connection, then) that checks, writes its SQL, says
    # with then(function, record) how the dicts change after COMMIT, and returns its result; _write
    # runs it (see there).

    def add_dealer(self, fields):
        def change(db, then):
            dealer = Dealer(id=db.insert("dealer", fields), **fields)
            then(self._put_dealer, dealer)
            return dealer
        return self._write(change)

    def update_dealer(self, dealer_id, changes):
        """A change of turnaround applies to bookings and windows made or moved from now on; the
        schedules as they stand stay valid."""
        def change(db, then):
            dealer = replace(self.dealer(dealer_id), **changes)
            db.update("dealer", dealer_id, {name: getattr(dealer, name) for name in DEALER_FIELDS})
            then(self._put_dealer, dealer)
            return dealer
        dealer = self._write(change)
        log.info("dealer %d changed: %s", dealer_id, ", ".join(sorted(changes)) or "nothing")
        return dealer

    def delete_dealer(self, dealer_id):
        def change(db, then):
            self.dealer(dealer_id)
            owned = sum(1 for car in self.cars.values() if car.dealer_id == dealer_id)
            if owned:
                raise Conflict(f"Dealer {dealer_id} still has {plural(owned, 'car')}; "
                               "move or delete them first.")
            db.delete("dealer", dealer_id)
            then(self._drop_dealer, dealer_id)
        self._write(change)

    # -- cars -----------------------------------------------------------------------------------

    def add_car(self, fields):
        def change(db, then):
            self.dealer(fields["dealer_id"])
            self._check_vin_free(fields["vin"])
            car = self.new_car(db.insert("car", fields), fields)
            then(self._put_car, car)
            return car
        car = self._write(change)
        log.info("car %d created: dealer %d, status %s", car.id, car.dealer_id, car.status)
        return car

    def update_car(self, car_id, changes):
        """Bookings keep the price they were made at, and the turnaround they were checked with."""
        def change(db, then):
            old = self.car(car_id)
            if "dealer_id" in changes:
                self.dealer(changes["dealer_id"])
            if changes.get("vin", old.vin) != old.vin:
                self._check_vin_free(changes["vin"])
            car = self.new_car(car_id, {name: getattr(old, name) for name in CAR_FIELDS} | changes)
            db.update("car", car_id, {name: getattr(car, name) for name in CAR_FIELDS})
            then(self._put_car, car)
            return car
        car = self._write(change)
        log.info("car %d changed: %s", car_id, ", ".join(sorted(changes)) or "nothing")
        return car

    def delete_car(self, car_id):
        """Only a car with no bookings; its maintenance windows go with it."""
        def change(db, then):
            self.car(car_id)
            schedule = self.schedules[car_id]
            booked = len(schedule.bookings())
            if booked:
                raise Conflict(f"Car {car_id} has {plural(booked, 'booking')}; "
                               "cancel them before deleting the car.")
            for window in schedule.windows():
                db.delete("window", window.id)
            db.delete("car", car_id)
            then(self._drop_car, car_id)
        self._write(change)
        log.info("car %d deleted", car_id)

    def new_car(self, car_id, fields):
        """A Car record with its public JSON form rendered once, here."""
        data = {"id": car_id} | {name: fields[name] for name in CAR_FIELDS}
        return Car(**data, json=to_json(CAR_SCHEMA.dump(data | {"currency": self.currency})).encode())

    def _check_vin_free(self, vin):
        if vin in self.car_by_vin:
            raise Conflict(f"VIN {vin} is already used by car {self.car_by_vin[vin]}.")

    # -- bookings -------------------------------------------------------------------------------

    def add_booking(self, fields):
        """A new booking reads and changes one car's schedule only: others like it, on other cars,
        share its transaction and its COMMIT."""
        check_not_past(fields["start_datetime"], datetime.now(timezone.utc))

        def change(db, then):
            start, end = fields["start_datetime"], fields["end_datetime"]
            car = self._check_bookable(fields["car_id"], start, end)
            row = fields | {"total_cents": price_cents(car.daily_price, start, end)}
            booking = Booking(id=db.insert("booking", row), **row)
            then(self._put_booking, booking)
            return booking
        booking = self._write(change, cars={fields["car_id"]})
        self._log("created", booking)
        return booking

    def change_booking(self, booking_id, changes):
        """Apply `changes` to a booking in one step, checked against the rest of the car's schedule.
        A move, or a change of car, prices the booking again at the car's price of today."""
        def change(db, then):
            old = self.booking(booking_id)
            booking = replace(old, **changes)
            check_window({"start_datetime": booking.start_datetime, "end_datetime": booking.end_datetime})
            if booking.start_datetime != old.start_datetime:  # a running booking may still change its end
                check_not_past(booking.start_datetime, datetime.now(timezone.utc))
            if (booking.car_id, booking.start_datetime, booking.end_datetime) != \
                    (old.car_id, old.start_datetime, old.end_datetime):
                car = self._check_bookable(booking.car_id, booking.start_datetime, booking.end_datetime, ignore=old)
                booking = replace(booking, total_cents=price_cents(car.daily_price, booking.start_datetime,
                                                                   booking.end_datetime))
            db.update("booking", booking_id, {name: getattr(booking, name) for name in BOOKING_FIELDS})
            then(self._put_booking, booking)
            return booking
        booking = self._write(change)
        self._log("changed", booking)
        return booking

    def cancel_booking(self, booking_id):
        def change(db, then):
            booking = self.booking(booking_id)
            db.delete("booking", booking_id)
            then(self._drop_booking, booking_id)
            return booking
        self._log("cancelled", self._write(change))

    def _check_bookable(self, car_id, start, end, ignore=None):
        """The car, if [start, end) can be booked on it: it is available, and the period, widened by
        its dealer's turnaround, overlaps no other entry of its schedule. Else 404 or 409."""
        car = self.car(car_id)
        if car.status != "available":
            raise Conflict(f"Car {car.id} is in {car.status} and cannot be booked.")
        for other in self.schedules[car.id].near(micros(start), micros(end), self.pad(car)):
            if other is not ignore:
                raise Conflict(self._clash(car, start, end, other))
        return car

    def _clash(self, car, start, end, other):
        """Why [start, end) cannot go on `car` beside the entry `other`: an overlap, or too little turnaround."""
        show, name = self.show, describe(other)
        if overlaps(start, end, other.start_datetime, other.end_datetime):
            if type(other) is Booking:
                return f"Car {car.id} is already booked from {show(other.start_datetime)} to " \
                       f"{show(other.end_datetime)} by {name}."
            return f"Car {car.id} is in maintenance from {show(other.start_datetime)} to " \
                   f"{show(other.end_datetime)}: {name}."
        turnaround = self.dealers[car.dealer_id].turnaround_minutes
        why = f"dealer {car.dealer_id} needs {plural(turnaround, 'minute')} of turnaround between two entries " \
              "of a car's schedule"
        pad = timedelta(minutes=turnaround)
        if other.end_datetime <= start:
            return f"Car {car.id} is not ready until {show(other.end_datetime + pad)}: {name} ends at " \
                   f"{show(other.end_datetime)}, and {why}."
        return f"Car {car.id} must be back by {show(other.start_datetime - pad)}, ready for {name} at " \
               f"{show(other.start_datetime)}: {why}."

    def _log(self, what, booking):
        # ids and times only: never the customer's name or e-mail
        log.info("booking %d %s: car %d, %s to %s", booking.id, what, booking.car_id,
                 self.show(booking.start_datetime), self.show(booking.end_datetime))

    # -- maintenance windows --------------------------------------------------------------------

    def add_window(self, car_id, fields):
        """A maintenance window on a car: it may not overlap, nor come within the turnaround of, a
        booking or another window. The 409 names up to 10 of the bookings in the way."""
        check_not_past(fields["start_datetime"], datetime.now(timezone.utc), "maintenance window")

        def change(db, then):
            car = self.car(car_id)
            start, end = fields["start_datetime"], fields["end_datetime"]
            hits = self.schedules[car_id].near(micros(start), micros(end), self.pad(car))
            in_the_way = [entry for entry in hits if type(entry) is Booking]
            if in_the_way:
                shown = in_the_way[:MAX_NAMED]
                named = "; ".join(f"{entry.id} ({self.show(entry.start_datetime)} to {self.show(entry.end_datetime)})"
                                  for entry in shown)
                more = f", and {len(in_the_way) - len(shown)} more" if len(in_the_way) > len(shown) else ""
                raise Conflict(f"The window would hit {plural(len(in_the_way), 'booking')} of car {car_id} "
                               f"(with dealer {car.dealer_id}'s {plural(self.pad(car) // MINUTE, 'minute')} of "
                               f"turnaround): {named}{more}. Move or cancel them first.")
            if hits:
                raise Conflict(self._clash(car, start, end, hits[0]))
            row = fields | {"car_id": car_id}
            window = MaintenanceWindow(id=db.insert("window", row), **row)
            then(self._put_window, window)
            return window
        window = self._write(change)
        log.info("maintenance window %d created: car %d, %s to %s", window.id, car_id,
                 self.show(window.start_datetime), self.show(window.end_datetime))
        return window

    def delete_window(self, car_id, window_id):
        def change(db, then):
            self.window(car_id, window_id)
            db.delete("window", window_id)
            then(self._drop_window, window_id)
        self._write(change)
        log.info("maintenance window %d deleted: car %d", window_id, car_id)

    def car_windows(self, car_id):
        with self.lock:
            self.car(car_id)
            return self.schedules[car_id].windows()

    # -- queries: under the lock too, so a reader never sees a schedule mid-change --------------

    def _masks(self):
        """The cars that can be offered as masks over their positions in the coverage: by turnaround
        (micros) and by dealer, each position's car, and its schedule's starts and ends (lists that
        change in place). Made once after each change of a car or dealer, and whenever the coverage
        is made again."""
        if self._coverage is None:
            self._coverage, self._offer_masks = Coverage(self.schedules), None
        if self._offer_masks is None:
            groups, dealers, cars, spans = {}, {}, {}, {}
            for car in self.cars.values():
                position, schedule = self._coverage.position[car.id], self.schedules[car.id]
                cars[position], spans[position] = car, (schedule.starts, schedule.ends)
                if car.status == "available":
                    groups[self.pad(car)] = groups.get(self.pad(car), 0) | 1 << position
                    dealers[car.dealer_id] = dealers.get(car.dealer_id, 0) | 1 << position
            self._offer_masks, self._chunks = (groups, dealers, cars, spans), {}
        return self._offer_masks

    def _free(self, start, end, dealer_id):
        """The cars free for [start, end) (micros), as a mask, and the masks (under the lock)."""
        groups, dealers, cars, spans = masks = self._masks()
        coverage = self._coverage
        free = 0
        for pad, offerable in groups.items():
            if dealer_id is not None:
                offerable &= dealers.get(dealer_id, 0)
            if not offerable:
                continue
            low, high = start - pad, end + pad
            split = coverage.split(low, high)
            if split is None:
                maybe = offerable
            else:
                free |= offerable & split[0]
                maybe = offerable & split[1]
            for position in coverage.positions(maybe) if maybe else ():
                starts, ends = spans[position]
                i = bisect.bisect_left(starts, high)
                if not (i and ends[i - 1] > low):
                    free |= 1 << position
        return free, masks

    def free_cars(self, start, end, dealer_id=None):
        """Cars whose status is available and whose schedule, widened by their dealer's turnaround,
        has no entry overlapping [start, end), by id."""
        with self.lock:
            free, (_, _, cars, _) = self._free(micros(start), micros(end), dealer_id)
            return [cars[position] for position in self._coverage.positions(free)]

    def free_cars_json(self, start, end, dealer_id=None):
        """free_cars as a JSON array (bytes) and their count, joined eight cars at a time from parts
        kept after each first use (the cars at positions 8i to 8i+7 that a search finds free)."""
        with self.lock:
            free, (_, _, cars, _) = self._free(micros(start), micros(end), dealer_id)
            chunks, parts = self._chunks, []
            if len(chunks) > MAX_CHUNKS:
                chunks.clear()
            for i, byte in enumerate(free.to_bytes((free.bit_length() + 7) // 8, "little")):
                if byte:
                    chunk = chunks.get(i << 8 | byte)
                    if chunk is None:
                        chunk = chunks[i << 8 | byte] = b",".join([cars[i * 8 + n].json for n in BITS[byte]])
                    parts.append(chunk)
            return json_array(parts), free.bit_count()

    def free_slots(self, length, after, before, offset, limit, dealer_id=None, brand=None, car_id=None):
        """For each car that can be offered and matches the filters, the earliest start (micros) of a
        period of `length` that starts at or after `after`, ends by `before` and can be booked, ordered
        by start, then car id: the page [offset, offset + limit) of them as (start, car), and how many
        there are in all. The day coverage tells at once which cars are free from `after` on; only
        the others are searched, one binary search each plus the entries in the way. Cars free at
        `after` come first, by id, as a mask: only when the page reaches past them are the later
        starts sorted."""
        length, after, before = length // MICROSECOND, micros(after), micros(before)
        latest = before - length  # the latest start that still ends by `before`
        if after > latest:
            return [], 0
        brand = brand.strip().casefold() if brand else None
        bisect_right = bisect.bisect_right
        with self.lock:
            groups, dealers, cars, spans = self._masks()
            coverage = self._coverage
            wanted = -1  # every position
            if dealer_id is not None:
                wanted = dealers.get(dealer_id, 0)
            if car_id is not None or brand is not None:
                wanted &= sum(1 << position for position, car in cars.items()
                              if (car_id is None or car.id == car_id) and (brand is None or car.brand.casefold() == brand))
            at_once, search = 0, {}
            for pad, offerable in groups.items():
                offerable &= wanted
                split = coverage.split(after - pad, after + length + pad) if offerable else None
                if split is not None:
                    at_once |= offerable & split[0]
                    offerable &= ~split[0]
                if offerable:
                    search[pad] = offerable
            # When the cars surely free at `after` fill the page already, the others are only counted.
            counting = at_once.bit_count() >= offset + limit
            free_now, later, counted = [], [], 0
            for pad, offerable in search.items():
                low, reach = after - pad, length + pad
                free_until = after + reach  # an entry starting from here leaves `after` free
                for position in coverage.positions(offerable):
                    # The earliest start at or after `after` free of every entry widened by `pad`:
                    # entries before i are done, pad included, by `after`; each one after that which
                    # reaches into [start, start + length) pushes the start to its end plus the pad
                    # (ends only grow), until the period fits or no longer ends by `before`.
                    starts, ends = spans[position]
                    i = bisect_right(ends, low)
                    try:
                        if starts[i] >= free_until:
                            free_now.append(position)
                            continue
                        start = ends[i] + pad
                        while starts[i + 1] < start + reach and start <= latest:
                            i += 1
                            start = ends[i] + pad
                    except IndexError:  # no entry (left) after `after`, or after i
                        if i == len(starts):
                            free_now.append(position)
                            continue
                    if start > latest:
                        continue
                    if counting:
                        counted += 1
                    else:
                        later.append((start, position))  # positions are in id order
            at_once |= sum(1 << position for position in free_now)
            first = at_once.bit_count()
            page = [(after, cars[position]) for position in
                    coverage.positions(at_once, offset + limit)[offset:offset + limit]]
            if offset + limit > first and later:
                later.sort()
                page += [(start, cars[position]) for start, position in
                         later[max(0, offset - first):offset + limit - first]]
        return page, first + len(later) + counted

    def cars_json(self):
        """Every car as one JSON array (bytes) and their count, made once after each change of a car."""
        with self.lock:
            if self._cars_json is None:
                self._cars_json = json_array([car.json for car in self.cars.values()]), len(self.cars)
            return self._cars_json

    def calendar(self, car_id, start, end):
        """One car, its entries that overlap [start, end), and the gaps in it where a booking could go
        (none for a car in maintenance), read together."""
        with self.lock:
            car = self.car(car_id)
            pad = self.pad(car)
            schedule = self.schedules[car_id]
            near = schedule.near(micros(start), micros(end), pad)
            entries = schedule.near(micros(start), micros(end))
        free = free_gaps(near, start, end, timedelta(microseconds=pad)) if car.status == "available" else []
        return car, entries, free, not near and car.status == "available"

    def entries(self, start, end, car_id=None, dealer_id=None):
        """(car, entry) for each booking and window that overlaps [start, end), car by car (one car, or
        one dealer's) in time order: one binary search per car, plus the entries found."""
        start, end = micros(start), micros(end)
        with self.lock:
            cars = [self.car(car_id)] if car_id is not None else \
                [car for car in self.cars.values() if dealer_id is None or car.dealer_id == dealer_id]
            return [(car, entry) for car in cars for entry in self.schedules[car.id].near(start, end)]

    def board_rows(self, start, end, dealer_id=None):
        """For the board: each dealer (or one) with its cars by id, each with its entries that overlap
        [start, end); one binary search per car, plus the entries shown."""
        start, end = micros(start), micros(end)
        with self.lock:
            rows = {dealer.id: (dealer, []) for dealer in self.dealers.values()
                    if dealer_id is None or dealer.id == dealer_id}
            for car in self.cars.values():
                if car.dealer_id in rows:
                    rows[car.dealer_id][1].append((car, self.schedules[car.id].near(start, end)))
        return list(rows.values())

    def quote(self, car_id, start, end):
        """What booking [start, end) on a car costs, and whether it can be booked now (as the calendar says)."""
        car, _, _, available = self.calendar(car_id, start, end)
        return {"car_id": car.id, "start_datetime": start, "end_datetime": end, "days": rental_days(start, end),
                "daily_price": car.daily_price, "total_cents": price_cents(car.daily_price, start, end),
                "available": available}

    def find_bookings(self, offset, limit, car_id=None, start=None, end=None, email=None):
        """One page of the bookings, ordered by start then id, and how many there are in all:
        overlapping [start, end) when both are given, starting at or after `start` or ending at or
        before `end` when only one is. Unfiltered or from a start, the page is read off the index
        (about the page's own cost); a filter by car, customer or end reads only its candidates."""
        with self.lock:
            if car_id is None and email is None and end is None:
                first = 0 if start is None else self.by_start.bisect_left(order_key(start, 0))
                keys = self.by_start[first + offset:first + offset + limit]
                return [self.bookings[key % ID_SPAN] for key in keys], len(self.by_start) - first
            if car_id is not None:
                found = self.schedules[car_id].bookings() if car_id in self.schedules else []
            elif email is not None:
                found = [self.bookings[i] for i in self.by_email.get(email.casefold(), ())]
            else:  # only those that start before `end` can end by it
                found = [self.bookings[key % ID_SPAN]
                         for key in self.by_start[:self.by_start.bisect_left(order_key(end, 0))]]
        if email is not None and car_id is None:
            found.sort(key=lambda b: (b.start_datetime, b.id))  # outside the lock: writers need not wait
        if start is not None and end is not None:
            found = [b for b in found if overlaps(b.start_datetime, b.end_datetime, start, end)]
        elif start is not None:
            found = [b for b in found if b.start_datetime >= start]
        elif end is not None:
            found = [b for b in found if b.end_datetime <= end]
        if email is not None:
            email = email.casefold()
            found = [b for b in found if b.customer_email.casefold() == email]
        return found[offset:offset + limit], len(found)

    def show(self, instant):
        """An instant as ISO 8601 in the store's zone."""
        return instant.astimezone(self.zone).isoformat()

    # -- keeping up with the database -------------------------------------------------------------

    def sync(self):
        """Bring the dicts up to date if another process (or app) committed since this one looked.

        Called before every request, through this thread's own read connection, so that the usual
        answer ("nothing new") needs no lock. If the database cannot be read, the request is
        answered from the dicts as they are; a write catches up (or fails with 503) inside its own
        transaction.
        """
        if not self.db.shared:
            return
        db = self.db.reader()
        try:
            version = db.data_version()
            if version == db.seen_version:  # nobody else has committed since this thread looked
                return
            newest = db.newest_change()  # read before the lock: the probe must not hold it up
            with self.lock:
                if newest == self._seen:  # only this process's own writes: nothing to apply
                    db.seen_version = version
                else:
                    self._catch_up(db)
        except sqlite3.Error as error:
            log.warning("could not read %s to catch up: %s", self.db.path, error)

    def ping(self):
        """A trivial read of the database; raises sqlite3.Error when it does not answer."""
        if self.db.shared:
            self.db.reader().ping()
        else:
            with self.write_lock:  # in memory there is only the one connection
                self.db.write.ping()

    def _write(self, change, cars=None):
        """Make one write, `change(db, then)`, and return what it returns (or raise what it raises).

        Group commit: writes that arrive while another is under way wait in a queue, and the next
        thread to run takes as many as can share one transaction: the first alone if it names no
        cars (`cars` None: it may read anything), else every write in turn that reads and changes
        only cars no other write of the batch touches. One transaction: SQLite's write lock (BEGIN
        IMMEDIATE), what other processes committed, each write's checks and SQL (under its own
        SAVEPOINT when it shares the transaction, so a refusal undoes only its own statements),
        COMMIT, one sync to disk for all; only then do the dicts change, in the order the writes
        ran. A refusal is raised to its own caller only; a database error (a 503) to every caller
        of the batch, and then nothing of it is kept.
        """
        job = Job(change, cars)
        with self.queue_lock:
            lead, self.leading = not self.leading, True
            if not lead:
                job.turn = threading.Event()  # only a write that waits needs one
            self.queue.append(job)
        if not lead:
            job.turn.wait()  # done, or this thread's turn to run the next batch
            if job.done:
                return job.outcome()
        try:
            while not job.done:
                with self.queue_lock:
                    batch = self._next_batch()
                try:
                    self._run(batch)
                finally:
                    for other in batch:
                        if not other.done:  # _run itself failed: never leave a caller waiting
                            other.error, other.done = InternalServerError("The write was interrupted."), True
                        if other is not job:
                            other.turn.set()
        finally:
            with self.queue_lock:  # hand the queue on to the thread of its first write, if any
                if not job.done and job in self.queue:  # a batch before it failed outright
                    self.queue.remove(job)
                if self.queue:
                    self.queue[0].turn.set()
                else:
                    self.leading = False
        return job.outcome()

    def _next_batch(self):
        """Take from the queue (under queue_lock) the writes that can share one transaction."""
        batch, cars = [], set()
        for job in self.queue:
            if job.cars is None:
                if not batch:
                    batch.append(job)
                break
            if len(batch) == MAX_BATCH or not cars.isdisjoint(job.cars):
                break
            batch.append(job)
            cars |= job.cars
        del self.queue[:len(batch)]
        return batch

    def _run(self, batch):
        """One transaction for the writes of `batch`; each ends done, with a result or an error."""
        shared = len(batch) > 1
        changes = []
        with self.write_lock:
            try:
                with self.db.write.transaction(write=True) as db:
                    if self.db.shared:
                        with self.lock:
                            self._catch_up(db)
                    seq = self._seen  # caught up, so the log ends here; each record written adds one entry
                    for job in batch:
                        if shared:
                            db.conn.execute("SAVEPOINT write")
                        db.written, then = 0, []
                        try:
                            with self.lock:
                                job.result = job.change(db, lambda change, record: then.append((change, record)))
                        except sqlite3.IntegrityError as error:
                            job.error = storage_error(self.db.path, error)
                        except sqlite3.Error:
                            raise  # the database itself: the whole batch fails
                        except Exception as error:  # a refusal (or a bug): this write's caller gets it
                            job.error = error
                        if job.error is None:
                            changes += then
                            seq += db.written
                        elif shared:
                            db.conn.execute("ROLLBACK TO write")
                        else:
                            raise Refused  # its statements undone with the transaction
                        if shared:
                            db.conn.execute("RELEASE write")
                    if seq // CHANGE_LOG_PRUNE_EVERY != self._seen // CHANGE_LOG_PRUNE_EVERY:
                        db.prune(seq - CHANGE_LOG_KEEP)
            except Refused:
                pass
            except sqlite3.Error as error:  # BEGIN, catching up, a statement or COMMIT: nothing was kept
                refusal = storage_error(self.db.path, error)
                for job in batch:
                    if job.error is None:
                        job.error = refusal
            else:
                with self.lock:
                    if self._seen < seq:  # unless a reader has caught up with it already
                        for change, record in changes:
                            change(record)
                        self._seen = seq
        for job in batch:
            job.done = True

    def _catch_up(self, db):
        """Apply the changes logged since this process last looked, read through `db` (under the lock)."""
        version = db.data_version()
        if version == db.seen_version:  # nobody else has committed since this connection looked
            return
        with db.transaction(write=False):
            changes = db.changes_since(self._seen)
            if changes is None:  # pruned past what this process has seen: start afresh
                log.info("%s: more changed than the change log keeps; reloading", self.db.path)
                self._reload(db)
                return
            changed, newest = changes
            if newest > self._seen:
                self._apply(db, changed)
                self._seen = newest
        db.seen_version = version

    def _reload(self, db):
        """Every dict built afresh from the database, in one read transaction (under the lock), and
        swapped in at the end: a lookup that takes no lock never sees a dict half filled."""
        with db.transaction(write=False):
            version, seen = db.data_version(), db.newest_change()
            dealers = {row[0]: Dealer(*row) for row in db.rows("dealer")}
            cars, car_by_vin, schedules, bookings, by_email, windows = {}, {}, {}, {}, {}, {}
            for row in db.rows("car"):
                car = cars[row[0]] = self.car_from_row(row)
                car_by_vin[car.vin], schedules[car.id] = car.id, Schedule()
            for row in db.rows("booking"):
                booking = bookings[row[0]] = booking_from_row(row)
                schedules[booking.car_id].add(booking)
                by_email.setdefault(booking.customer_email.casefold(), set()).add(booking.id)
            for row in db.rows("window"):
                window = windows[row[0]] = window_from_row(row)
                schedules[window.car_id].add(window)
            by_start = SortedList(order_key(b.start_datetime, b.id) for b in bookings.values())
        self.dealers, self.cars, self.car_by_vin, self.schedules, self.bookings, self.by_start, self.by_email = \
            dealers, cars, car_by_vin, schedules, bookings, by_start, by_email
        self.windows = windows
        self._cars_json = self._coverage = self._offer_masks = None  # made when next asked for
        db.seen_version, self._seen = version, seen

    def _apply(self, db, changed):
        """Bring each changed record to its state in the database: dealers and cars first (a new
        booking may need them), bookings and windows out of their schedules before any goes back in
        (a move may swap two), and removed cars and dealers last (their bookings and cars went first)."""
        rows = {kind: db.rows(kind, ids) for kind, ids in changed.items()}
        for row in rows.get("dealer", {}).values():
            if row is not None:
                self._put_dealer(Dealer(*row))
        for row in rows.get("car", {}).values():
            if row is not None:
                self._put_car(self.car_from_row(row))
        for booking_id in rows.get("booking", {}):
            if booking_id in self.bookings:
                self._drop_booking(booking_id)
        for window_id in rows.get("window", {}):
            if window_id in self.windows:
                self._drop_window(window_id)
        for row in rows.get("booking", {}).values():
            if row is not None:
                self._put_booking(booking_from_row(row))
        for row in rows.get("window", {}).values():
            if row is not None:
                self._put_window(window_from_row(row))
        for car_id, row in rows.get("car", {}).items():
            if row is None and car_id in self.cars:
                self._drop_car(car_id)
        for dealer_id, row in rows.get("dealer", {}).items():
            if row is None and dealer_id in self.dealers:
                self._drop_dealer(dealer_id)

    # -- the dicts: changed only here, after COMMIT ------------------------------------------------

    def _put_dealer(self, dealer):
        self.dealers[dealer.id] = dealer
        self._offer_masks = None  # its turnaround may have changed

    def _drop_dealer(self, dealer_id):
        del self.dealers[dealer_id]

    # A VIN maps to a car only while that car holds it: when a batch of changes swaps VINs between
    # cars, or gives a deleted car's VIN to a new one, a later step must not remove the new owner.

    def _put_car(self, car):
        old = self.cars.get(car.id)
        if old is not None and self.car_by_vin.get(old.vin) == car.id:
            del self.car_by_vin[old.vin]
        self.car_by_vin[car.vin] = car.id
        self.cars[car.id] = car
        self.schedules.setdefault(car.id, Schedule())
        if self._coverage is not None and old is None and not self._coverage.add_car(car.id):
            self._coverage = None
        self._cars_json = self._offer_masks = None

    def _drop_car(self, car_id):
        car = self.cars.pop(car_id)
        if self.car_by_vin.get(car.vin) == car_id:
            del self.car_by_vin[car.vin]
        for window in self.schedules.pop(car_id).windows():
            del self.windows[window.id]
        if self._coverage is not None:
            self._coverage.drop_car(car_id)
        self._cars_json = self._offer_masks = None

    def _put_booking(self, booking):
        old = self.bookings.get(booking.id)
        if old is not None:
            self._unschedule(old)
        self.bookings[booking.id] = booking
        self._schedule(booking)
        self.by_start.add(order_key(booking.start_datetime, booking.id))
        self.by_email.setdefault(booking.customer_email.casefold(), set()).add(booking.id)

    def _drop_booking(self, booking_id):
        self._unschedule(self.bookings.pop(booking_id))

    def _put_window(self, window):
        self.windows[window.id] = window
        self._schedule(window)

    def _drop_window(self, window_id):
        self._unschedule_entry(self.windows.pop(window_id))

    def _schedule(self, entry):
        self.schedules[entry.car_id].add(entry)
        if self._coverage is not None:
            self._coverage.add(entry.car_id, micros(entry.start_datetime), micros(entry.end_datetime))

    def _unschedule_entry(self, entry):
        schedule = self.schedules[entry.car_id]
        schedule.remove(entry)
        if self._coverage is not None:
            self._coverage.remove(entry.car_id, micros(entry.start_datetime), micros(entry.end_datetime),
                                  schedule.starts, schedule.ends)

    def car_from_row(self, row):
        return self.new_car(row[0], dict(zip(CAR_FIELDS, row[1:])))

    def _unschedule(self, booking):
        self._unschedule_entry(booking)
        self.by_start.remove(order_key(booking.start_datetime, booking.id))
        ids = self.by_email[booking.customer_email.casefold()]
        ids.discard(booking.id)
        if not ids:
            del self.by_email[booking.customer_email.casefold()]


DEALER_FIELDS = ("name", "location", "turnaround_minutes")
CAR_FIELDS = ("brand", "model", "year", "color", "daily_price", "vin", "status", "dealer_id")
BOOKING_FIELDS = ("car_id", "customer_name", "customer_email", "start_datetime", "end_datetime", "total_cents")
BOOKING_FIELDS_SENT = frozenset(BOOKING_FIELDS[:-1])  # the body of a new booking: all but its price
WINDOW_FIELDS = ("car_id", "start_datetime", "end_datetime", "note")
MAX_NAMED = 10  # bookings a refused maintenance window names
MAX_CHUNKS = 100_000  # parts of available-cars answers kept ready; beyond, they are made afresh
car_id_of = operator.attrgetter("id")


def describe(entry):
    """An entry of a schedule in words: 'booking 7', or 'maintenance window 2 (Brake check)'."""
    if type(entry) is Booking:
        return f"booking {entry.id}"
    return f"maintenance window {entry.id}" + (f" ({entry.note})" if entry.note else "")


def plural(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


to_json = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps() with options makes one per call


def json_array(parts):
    """A JSON array body (bytes, ending with a newline) from items that are already JSON (bytes)."""
    return b"[" + b",".join(parts) + b"]\n"


def store():
    """The store of the app handling this request."""
    return current_app.extensions[EXTENSION]


# ---------------------------------------------------------------------------------------------
# The database under the dicts: SQLite through the standard library. The schema and its
# upgrades, every SQL statement, the change log that other processes catch up from, backups.
# ---------------------------------------------------------------------------------------------

MEMORY = ":memory:"
APPLICATION_ID = 0x4445_4C52  # "DELR", written in the file's header: this is a dealership database
SCHEMA_VERSION = 2  # PRAGMA user_version
# Each step takes the schema from the version before it to its own; a new file runs them all.
# Plain SQL that PostgreSQL accepts too, but for AUTOINCREMENT (ids never reused, even after a delete).
MIGRATIONS = {
    1: """
    CREATE TABLE dealers (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        location TEXT NOT NULL
    );
    CREATE TABLE cars (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        brand TEXT NOT NULL,
        model TEXT NOT NULL,
        year INTEGER NOT NULL,
        color TEXT NOT NULL,
        daily_price REAL NOT NULL CHECK (daily_price > 0),
        vin TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL CHECK (status IN ('available', 'maintenance')),
        dealer_id INTEGER NOT NULL REFERENCES dealers (id)
    );
    -- Times in UTC as ISO 8601 with microseconds and +00:00: one width, so text order is time order.
    CREATE TABLE bookings (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        car_id INTEGER NOT NULL REFERENCES cars (id),
        customer_name TEXT NOT NULL,
        customer_email TEXT NOT NULL,
        start_datetime TEXT NOT NULL,
        end_datetime TEXT NOT NULL,
        CHECK (end_datetime > start_datetime)
    );
    -- One row per changed record, in commit order: what other processes read to catch up.
    -- Written by triggers, in the transaction of the change itself, whoever makes it.
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        id INTEGER NOT NULL
    );
    """,
    # Maintenance windows, dealers' turnaround, and the price of each booking (whole cents, fixed when
    # it is made or moved: bookings made before this version are priced at their car's price of today).
    2: """
    ALTER TABLE dealers ADD COLUMN turnaround_minutes INTEGER NOT NULL DEFAULT 0
        CHECK (turnaround_minutes BETWEEN 0 AND 1440);
    ALTER TABLE bookings ADD COLUMN total_cents INTEGER NOT NULL DEFAULT 0 CHECK (total_cents >= 0);
    CREATE TABLE maintenance_windows (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        car_id INTEGER NOT NULL REFERENCES cars (id),
        start_datetime TEXT NOT NULL,
        end_datetime TEXT NOT NULL,
        note TEXT NOT NULL DEFAULT '',
        CHECK (end_datetime > start_datetime)
    );
    """,
}
# The triggers that fill the change log, by schema version: on a file only, as in memory no other
# process reads the log.
def change_log_triggers(tables):
    return "".join(f"""
    CREATE TRIGGER {table}_{event.lower()} AFTER {event} ON {table}
    BEGIN INSERT INTO changes (kind, id) VALUES ('{kind}', {row}.id); END;"""
                   for kind, table in tables
                   for event, row in [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")])


CHANGE_LOG_TRIGGERS = {1: change_log_triggers([("dealer", "dealers"), ("car", "cars"), ("booking", "bookings")]),
                       2: change_log_triggers([("window", "maintenance_windows")])}
# kind -> table and its columns besides id
TABLES = {"dealer": ("dealers", DEALER_FIELDS),
          "car": ("cars", CAR_FIELDS),
          "booking": ("bookings", BOOKING_FIELDS),
          "window": ("maintenance_windows", WINDOW_FIELDS)}
# The change log keeps this many changes; a process further behind than that reloads in full.
CHANGE_LOG_KEEP = 10_000
CHANGE_LOG_PRUNE_EVERY = 500  # changes between two prunings


class Database:
    """The database file (or memory) of one store, and its connections.

    `write` is used by one writer at a time (the store's write lock). On a file, each thread that
    serves requests also has a read connection of its own (`reader()`), to see whether another
    process has committed and to catch up, so that a reader never waits for a writer's COMMIT nor
    for another reader. In memory there is only `write`, as no other process can write. Opening a
    file checks it (ours, not newer, not damaged), upgrades its schema and puts it in WAL mode; any
    problem is a ConfigError.
    """

    def __init__(self, path, synchronous="full", busy_timeout=5.0):
        self.path = path
        self.shared = path != MEMORY  # a file can have other processes (or apps) on it
        self.busy_timeout = busy_timeout
        self._readers = threading.local()
        self.write = Connection(path, busy_timeout, self._refusal)
        try:
            self._prepare(self.write.conn, synchronous)
            self.write.conn.execute("PRAGMA busy_timeout = 0")  # see Connection._begin_immediate
        except sqlite3.Error as error:
            self.write.conn.close()
            raise self._refusal(error) from None
        except ConfigError:
            self.write.conn.close()
            raise

    def reader(self):
        """This thread's read connection to the file, opened on first use."""
        reader = getattr(self._readers, "connection", None)
        if reader is None:
            reader = self._readers.connection = Connection(self.path, self.busy_timeout, self._refusal)
            reader.conn.execute("PRAGMA query_only = ON")
        return reader

    def _prepare(self, conn, synchronous):
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]  # "not a database" shows here
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id or tables):
            raise ConfigError(f"DEALERSHIP_DATABASE={self.path!r} is a SQLite database of another "
                              "application: point the setting at the service's own file, or at a "
                              "path that does not exist yet to start afresh.")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"DEALERSHIP_DATABASE={self.path!r} was written by a newer version of "
                              f"the service (schema {version}; this one knows up to {SCHEMA_VERSION}): "
                              "run that version, or restore a backup made by this one.")
        if self.shared and tables:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise self._refusal(problems[0])
        if self.shared and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for a writer
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        if version < SCHEMA_VERSION:
            self._upgrade()

    def _upgrade(self):
        with self.write.transaction(write=True) as db:
            version = db.conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have
            for step in range(version + 1, SCHEMA_VERSION + 1):
                db.script(MIGRATIONS[step])
                if self.shared:
                    db.script(CHANGE_LOG_TRIGGERS[step])
                if step == 2:
                    db.price_old_bookings()
            if version == 0:
                db.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.insert("dealer", SEED_DEALER)
            db.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version == 0:
            log.info("%s: new database, schema version %d", self.path, SCHEMA_VERSION)
        elif version < SCHEMA_VERSION:
            log.info("%s: schema upgraded from version %d to %d", self.path, version, SCHEMA_VERSION)

    def _refusal(self, error):
        """A ConfigError for a file that cannot be used, saying what to do about it."""
        text = str(error)
        if "not a database" in text:
            what = "is not a SQLite database: point the setting at the service's own file"
        elif "locked" in text:
            what = ("is locked by another process for longer than DEALERSHIP_BUSY_TIMEOUT: "
                    "start again once it is free")
        elif "malformed" in text or "corrupt" in text or not isinstance(error, sqlite3.Error):
            what = f"is damaged ({text}): stop the service and restore the latest backup (see the README)"
        else:
            what = f"cannot be used ({text}): check the file and the permissions of its folder"
        return ConfigError(f"DEALERSHIP_DATABASE={self.path!r} {what}.")

    def backup(self, target):
        """A consistent copy of the database at `target`, taken while the service runs (SQLite's
        online backup), written beside it first and then renamed, so `target` is never half a copy."""
        partial = f"{target}.partial"
        source = sqlite3.connect(self.path, timeout=30)
        copy = sqlite3.connect(partial, isolation_level=None)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            counts = {table: copy.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                      for table, _ in TABLES.values()}
        finally:
            copy.close()
            source.close()
        os.replace(partial, target)
        return counts


class Connection:
    """One SQLite connection in autocommit mode: every transaction is written out as BEGIN ...
    COMMIT, so that a check and its write sit in one. Every SQL statement of the service is here."""

    def __init__(self, path, busy_timeout, refusal):
        self.busy_timeout = busy_timeout
        self.written = 0  # records written since the store's write began (one change-log entry each)
        self.seen_version = None  # PRAGMA data_version when the store last caught up through here
        try:
            self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                                        check_same_thread=False)
            self.conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as error:
            raise refusal(error) from None

    # -- transactions ---------------------------------------------------------------------------

    @contextmanager
    def transaction(self, write):
        """BEGIN IMMEDIATE (the write lock, taken first) or BEGIN (a read snapshot) ... COMMIT;
        ROLLBACK on any error. Inside another transaction, that one is used."""
        if self.conn.in_transaction:
            yield self
            return
        if write:
            self._begin_immediate()
        else:
            self.conn.execute("BEGIN")
        try:
            yield self
            self.conn.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise

    def _begin_immediate(self):
        """Take the write lock, waiting up to the busy timeout while another process holds it.

        SQLite's own wait sleeps 1, 2, 5, 10 ms and more between tries, far longer than a commit
        takes; this one tries again after 0.1 ms, doubling to at most 2 ms. (The write connection's
        own busy timeout is 0, so that SQLite answers at once.)"""
        deadline, pause = time.monotonic() + self.busy_timeout, 0.0001
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as error:
                if getattr(error, "sqlite_errorname", "") != "SQLITE_BUSY" or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    def script(self, sql):
        """Run statements one by one inside the transaction (executescript() would COMMIT first)."""
        statement = ""
        for part in sql.split(";"):
            statement += part + ";"
            if sqlite3.complete_statement(statement):
                if statement.strip(" \n;"):
                    self.conn.execute(statement)
                statement = ""

    def rollback(self):
        if self.conn.in_transaction:
            try:
                self.conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # SQLite rolls back by itself when it cannot go on

    # -- records --------------------------------------------------------------------------------

    # One record each, so one entry in the change log each (its triggers write it).

    def insert(self, kind, fields):
        """Insert a record; the database assigns the id."""
        table, columns = TABLES[kind]
        self.written += 1
        return self.conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
            [stored(fields[name]) for name in columns]).lastrowid

    def update(self, kind, record_id, fields):
        table, columns = TABLES[kind]
        self.written += 1
        self.conn.execute(f"UPDATE {table} SET {', '.join(f'{name} = ?' for name in columns)} WHERE id = ?",
                          [stored(fields[name]) for name in columns] + [record_id])

    def delete(self, kind, record_id):
        self.written += 1
        self.conn.execute(f"DELETE FROM {TABLES[kind][0]} WHERE id = ?", (record_id,))

    def rows(self, kind, ids=None):
        """Every row of a kind by id or, given ids, a dict of id -> row in id order, None for a
        record that is gone."""
        table, columns = TABLES[kind]
        select = f"SELECT id, {', '.join(columns)} FROM {table}"
        if ids is None:
            return self.conn.execute(select + " ORDER BY id")
        found = dict.fromkeys(ids)
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            for row in self.conn.execute(f"{select} WHERE id IN ({', '.join('?' * len(chunk))})", chunk):
                found[row[0]] = row
        return found

    def price_old_bookings(self):
        """Schema 2: each booking made before prices, priced at its car's daily price of today."""
        prices = dict(self.conn.execute("SELECT id, daily_price FROM cars"))
        for booking_id, car_id, start, end in list(self.conn.execute(
                "SELECT id, car_id, start_datetime, end_datetime FROM bookings")):
            cents = price_cents(prices[car_id], datetime.fromisoformat(start), datetime.fromisoformat(end))
            self.conn.execute("UPDATE bookings SET total_cents = ? WHERE id = ?", (cents, booking_id))

    def is_empty(self):
        return self.conn.execute("SELECT NOT EXISTS (SELECT 1 FROM cars)").fetchone()[0]

    def ping(self):
        self.conn.execute("SELECT count(*) FROM (SELECT 1 FROM dealers LIMIT 1)").fetchone()

    # -- the change log -------------------------------------------------------------------------

    def prune(self, through):
        """Forget the changes up to `through`; the newest is always kept."""
        self.conn.execute("DELETE FROM changes WHERE seq <= ?", (through,))

    def data_version(self):
        """Changes whenever another connection has committed since the last call."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def newest_change(self):
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    def changes_since(self, seq):
        """({kind: sorted ids} changed after `seq`, the newest seq), or None when the log no longer
        reaches back that far."""
        oldest = self.conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
        if oldest is not None and oldest > seq + 1:
            return None
        changed = {}
        for seq, kind, record_id in self.conn.execute(
                "SELECT seq, kind, id FROM changes WHERE seq > ? ORDER BY seq", (seq,)):
            changed.setdefault(kind, set()).add(record_id)
        return {kind: sorted(ids) for kind, ids in changed.items()}, seq


def stored(value):
    """A value as the database keeps it: instants in UTC, as fixed-width ISO 8601 text."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return value


def booking_from_row(row):
    booking_id, car_id, name, email, start, end, cents = row
    return Booking(booking_id, car_id, name, email, datetime.fromisoformat(start), datetime.fromisoformat(end), cents)


def window_from_row(row):
    window_id, car_id, start, end, note = row
    return MaintenanceWindow(window_id, car_id, datetime.fromisoformat(start), datetime.fromisoformat(end), note)


def storage_error(path, error):
    """What a client is told when SQLite refuses a write: 503, nothing changed, try again later."""
    code = getattr(error, "sqlite_errorname", "")
    if isinstance(error, sqlite3.IntegrityError):
        return Conflict(f"The change conflicts with the stored data ({error}); nothing was changed.")
    if code.startswith("SQLITE_BUSY") or "locked" in str(error):
        detail, retry = ("The database is busy: another process held it for longer than "
                         "DEALERSHIP_BUSY_TIMEOUT. Nothing was changed; try again."), 1
    elif code.startswith("SQLITE_READONLY"):
        detail, retry = ("The database file is read-only, so nothing can be changed; reads still work. "
                         "An operator must make the file and its folder writable."), 60
    elif code.startswith("SQLITE_FULL"):
        detail, retry = "The disk that holds the database is full; nothing was changed.", 60
    else:
        detail, retry = f"The database refused the change ({error}); nothing was changed.", 10
    log.error("write refused by %s: %s", path, error)
    return ServiceUnavailable(detail, retry_after=retry)


# ---------------------------------------------------------------------------------------------
# Schemas: the one definition of every field, for input and output
# ---------------------------------------------------------------------------------------------


class Text(fields.String):
    """A string checked against `pattern` as sent, then stored with surrounding spaces stripped and
    in Unicode's composed form (NFC), so that one text is stored one way.

    The pattern is also the field's `pattern` in the OpenAPI document, so the document and the
    service accept exactly the same strings.
    """

    def __init__(self, *, pattern, error, metadata=None, **kwargs):
        super().__init__(metadata={"pattern": pattern} | (metadata or {}), **kwargs)
        self.regex, self.error = re.compile(pattern), error

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        if not self.regex.search(value) or LONE_SURROGATE.search(value):
            raise ValidationError(self.error)
        return unicodedata.normalize("NFC", value.strip())


def text(max_length, min_length=1, **kwargs):
    """A Text of at most `max_length` characters with no control character (tab and newline
    included) nor lone surrogate, and at least one character that is neither whitespace nor an
    invisible format character; with `min_length` 0, it may also be empty. Stored stripped of
    surrounding spaces. (A regex with no lookahead, so that fuzzers can generate from it.)"""
    core = rf"{CHAR}*{VISIBLE}{CHAR}*"
    pattern = rf"^{core}$" if min_length else rf"^(?:{core})?$"
    return Text(pattern=pattern, validate=validate.Length(max=max_length), error=(
        f"Must be {'1' if min_length else '0'} to {max_length} characters with no control character (tab and "
        "newline included), and not only spaces or invisible format characters."), **kwargs)


class Vin(Text):
    """A VIN, accepted in any case and stored upper-case."""

    def __init__(self, **kwargs):
        super().__init__(pattern=VIN_PATTERN, error="Must be 17 characters of A-H, J-N, P, R-Z and 0-9 "
                         "(no I, O or Q).", **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).upper()


class EmailAddress(fields.String):
    """An e-mail address, checked and normalized by email-validator (syntax only: no network look-up).

    Internationalized domains are IDNA-checked and stored normalized; a@localhost, an IP address
    after the @ and invisible characters are refused. Filters compare these normalized forms.
    """

    def __init__(self, *, metadata=None, **kwargs):
        super().__init__(metadata={"format": "email"} | (metadata or {}), **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            return normalized_email(value)
        except email_validator.EmailNotValidError as error:
            raise ValidationError(f"Not a valid e-mail address: {error}") from None


@functools.lru_cache(maxsize=10_000)
def normalized_email(address):
    """email-validator's normal form of an address, or EmailNotValidError. A pure function that takes
    some 20 us a call, so the addresses seen last (customers come back) are remembered."""
    return email_validator.validate_email(address, check_deliverability=False).normalized


class Count(fields.Integer):
    """A whole number in a query string: ASCII digits only (int() would also take '１０', '1_0' and ' 10')."""

    default_error_messages = {"invalid": "Must be a whole number written with the digits 0 to 9."}

    def _validated(self, value):
        if isinstance(value, str) and not (value.isascii() and value.isdigit()):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class JSONNumber(fields.Float):
    """A JSON number: a string such as "100" is refused, not converted."""

    def _validated(self, value):
        if not isinstance(value, (int, float)):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class Instant(fields.DateTime):
    """An RFC 3339 date-time read as an aware UTC instant and written in the store's zone.

    YYYY-MM-DDTHH:MM:SS, up to six digits of fraction, then Z or +HH:MM / -HH:MM; T and Z in either
    case. Without an offset it is taken in the store's zone (UTC unless configured). Nothing else:
    no week dates, basic format, date alone, comma fraction or offset with seconds. In a query
    string (`in_query`), an unencoded "+" arrives as a space, and "10:00:00 02:00" means "+02:00".
    """

    default_error_messages = {
        "invalid": "Not an RFC 3339 date-time: write it as 2030-06-01T09:00:00+02:00 (or with Z for UTC, "
                   "or with no offset for the dealership's time zone).",
        "range": "Date-time is out of the supported range.",
        "gap": "{input} does not exist in {zone}: the clocks skip that hour."}
    FORM = re.compile(r"(\d{4}-\d\d-\d\d)[Tt](\d\d:\d\d:\d\d(?:\.\d{1,6})?)([Zz]|[+-]\d\d:\d\d)?")
    PLUS_AS_SPACE = re.compile(r"(T\d\d:\d\d:\d\d(?:\.\d{1,6})?) (\d\d:\d\d)$", re.IGNORECASE)

    def __init__(self, *, in_query=False, **kwargs):
        super().__init__(**kwargs)
        self.in_query = in_query

    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, str):
            raise self.make_error("invalid")
        if self.in_query:
            value = self.PLUS_AS_SPACE.sub(r"\1+\2", value)
        form = self.FORM.fullmatch(value)
        try:
            moment = datetime.fromisoformat(f"{form[1]}T{form[2]}{(form[3] or '').upper()}")
        except (TypeError, ValueError):  # no match, or a day or hour that does not exist
            raise self.make_error("invalid") from None
        zone = store().zone
        try:
            if moment.tzinfo is None:
                local, moment = moment, moment.replace(tzinfo=zone)
                if moment.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) != local:
                    raise self.make_error("gap", input=value, zone=zone)
            moment.astimezone(zone)  # the output must be writable in the store's zone too
            return moment.astimezone(timezone.utc)
        except OverflowError:
            raise self.make_error("range") from None

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else store().show(value)


class Money(fields.Float):
    """A price held in whole cents, written as a JSON number of the currency (12990 -> 129.9)."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value / 100


class Currency(fields.String):
    """The service's currency (DEALERSHIP_CURRENCY), written beside a price: the store's, unless the
    data dumped names one (a car's JSON is rendered while its store is being made)."""

    def serialize(self, attr, obj, accessor=None, **kwargs):
        return (obj.get("currency") if isinstance(obj, dict) else None) or store().currency


class Duration(fields.String):
    """An ISO 8601 duration of days, hours and minutes (P3D, PT4H, P1DT12H), read as a timedelta."""

    def _deserialize(self, value, attr, data, **kwargs):
        length = parse_duration(super()._deserialize(value, attr, data, **kwargs))
        if length is None or not MIN_SLOT <= length <= MAX_SLOT:
            raise ValidationError("Must be an ISO 8601 duration of days, hours and minutes from 15 minutes "
                                  "to 90 days, such as P3D (three days), PT4H (four hours) or P1DT12H.")
        return length


class UpToNextYear(validate.Range):
    """FIRST_CAR_YEAR to next calendar year; `max` is read at each use, so it moves on 1 January."""

    def __init__(self):
        super().__init__(min=FIRST_CAR_YEAR, max=None)

    @property
    def max(self):
        return datetime.now(timezone.utc).year + 1

    @max.setter
    def max(self, value):
        pass  # fixed by the calendar, not by the caller


def check_window(data):
    """end_datetime must be after start_datetime: raised on end_datetime."""
    start, end = data.get("start_datetime"), data.get("end_datetime")
    if start is not None and end is not None and end <= start:
        raise ValidationError("Must be after start_datetime.", field_name="end_datetime")


def about(description, example=None):
    """A field's metadata for the OpenAPI document: its rule in words, and an example that is valid
    as it is (date-times get theirs when the document is made: a week ahead of today)."""
    return {"description": description} | ({} if example is None else {"example": example})


STRIPPED = "surrounding spaces are removed"


class EndAfterStart:
    """For a schema with start_datetime and end_datetime: the end must be after the start."""

    @validates_schema
    def end_after_start(self, data, **kwargs):
        check_window(data)


class DealerSchema(Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    name = text(200, required=True, metadata=about(f"1 to 200 characters; {STRIPPED}.", "Oscar Mobility South"))
    location = text(200, min_length=0, load_default="",
                    metadata=about(f"Up to 200 characters, empty if left out; {STRIPPED}.", "Stuttgart, Germany"))
    turnaround_minutes = fields.Integer(strict=True, load_default=0, validate=validate.Range(min=0, max=MAX_TURNAROUND),
                                        metadata=about(
        "Minutes from 0 (the default) to 1440 that each of the dealer's cars needs between two entries of its "
        "schedule (cleaning, a check): a booking ending at 10:00 with 60 leaves the car bookable from 11:00. "
        "A change applies to bookings and windows made or moved from then on; existing ones stay valid.", 60))


class CarSchema(Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    brand = text(100, required=True, metadata=about(f"The make: 1 to 100 characters; {STRIPPED}.", "Volkswagen"))
    model = text(100, required=True, metadata=about(f"1 to 100 characters; {STRIPPED}.", "Golf"))
    year = fields.Integer(required=True, strict=True, validate=UpToNextYear(),
                          metadata=about("Model year: a whole number from 1886 to next year.", 2024))
    color = text(100, required=True, metadata=about(f"1 to 100 characters; {STRIPPED}.", "Grey"))
    daily_price = JSONNumber(required=True, validate=validate.Range(min=MIN_DAILY_PRICE, max=MAX_DAILY_PRICE),
                             metadata=about("Price per day: a number from 0.01 to 1,000,000.", 64.5))
    vin = Vin(required=True, metadata=about(
        "Vehicle identification number: 17 letters and digits, never I, O or Q; any case, stored upper "
        "case; no two cars share one.", "WVWZZZ1KZAW123456"))
    status = fields.String(load_default="available", validate=validate.OneOf(CAR_STATUSES), metadata=about(
        "'available' (the default) or 'maintenance': a car in maintenance cannot be booked.", "available"))
    dealer_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1),
                               metadata=about("The dealer that owns the car; it must exist.", 1))
    currency = Currency(dump_only=True, metadata=about("The currency of daily_price (DEALERSHIP_CURRENCY).", "EUR"))


START = ("When the booking starts: an ISO 8601 date-time with an offset (2030-06-01T09:00:00+02:00), "
         "or without one for the dealership's time zone; not in the past.")
END = ("When it ends, after the start. The booking holds [start, end): at this very instant the car "
       "is free again.")


class BookingSchema(EndAfterStart, Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    car_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1),
                            metadata=about("The car to book; it must exist and be available.", 1))
    customer_name = text(MAX_NAME, required=True, metadata=about(f"1 to {MAX_NAME} characters; {STRIPPED}.",
                                                                  "Ada Lovelace"))
    customer_email = EmailAddress(required=True, validate=validate.Length(max=MAX_EMAIL), metadata=about(
        f"An e-mail address, at most {MAX_EMAIL} characters.", "ada@example.com"))
    start_datetime = Instant(required=True, metadata=about(START))
    end_datetime = Instant(required=True, metadata=about(END))
    total_price = Money(attribute="total_cents", dump_only=True, metadata=about(
        "The car's daily_price times the started 24-hour periods (at least one), rounded to cents: fixed "
        "when the booking is made, and priced again only when it is moved or changes car.", 129.0))
    currency = Currency(dump_only=True, metadata=about("The currency of total_price.", "EUR"))


class MaintenanceWindowSchema(EndAfterStart, Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    car_id = fields.Integer(dump_only=True, metadata=about("The car, as in the path."))
    start_datetime = Instant(required=True, metadata=about(
        "When the car goes into the workshop: as a booking's start, not in the past."))
    end_datetime = Instant(required=True, metadata=about("When it is back, after the start: [start, end)."))
    note = text(200, min_length=0, load_default="", metadata=about(
        f"What is done, up to 200 characters, empty if left out; {STRIPPED}.", "Brake check"))


class QuoteSchema(Schema):
    car_id = fields.Integer(metadata=about("The car."))
    start_datetime = Instant(metadata=about("The period asked for: its start."))
    end_datetime = Instant(metadata=about("The period asked for: its end."))
    days = fields.Integer(metadata=about("Started 24-hour periods in it: at least one.", 2))
    daily_price = fields.Float(metadata=about("The car's price per day, today.", 64.5))
    total_price = Money(attribute="total_cents", metadata=about(
        "daily_price times days, rounded to cents: what a booking made now would cost.", 129.0))
    currency = Currency(metadata=about("The currency of the prices.", "EUR"))
    available = fields.Boolean(metadata=about(
        "True when the car can be booked for the period now (as its availability says).", True))


class OfferSchema(Schema):
    car_id = fields.Integer(metadata=about("The car."))
    start_datetime = Instant(metadata=about("The earliest start at which the car is free for the duration."))
    end_datetime = Instant(metadata=about("start_datetime plus the duration."))
    total_price = Money(attribute="total_cents", metadata=about("What booking this slot costs.", 129.0))
    currency = Currency(metadata=about("The currency of total_price.", "EUR"))


class SlotSchema(Schema):
    start_datetime = Instant(metadata=about("Start of the gap, in the dealership's time zone."))
    end_datetime = Instant(metadata=about("End of the gap: the first instant that is not free."))


class BusySchema(Schema):
    booking_id = fields.Integer(attribute="id", metadata=about("The booking that holds the car."))
    start_datetime = Instant(metadata=about("Its start, not clipped to the window."))
    end_datetime = Instant(metadata=about("Its end, not clipped to the window."))


class WindowInCalendarSchema(Schema):
    window_id = fields.Integer(attribute="id", metadata=about("The maintenance window."))
    start_datetime = Instant(metadata=about("Its start, not clipped to the period."))
    end_datetime = Instant(metadata=about("Its end, not clipped to the period."))
    note = fields.String(metadata=about("What is done."))


class CalendarSchema(Schema):
    car_id = fields.Integer(metadata=about("The car."))
    start_datetime = Instant(metadata=about("The period asked for: its start."))
    end_datetime = Instant(metadata=about("The period asked for: its end."))
    status = fields.String(metadata=about("The car's status: 'available' or 'maintenance'."))
    turnaround_minutes = fields.Integer(metadata=about("Its dealer's turnaround: the least gap around each entry."))
    available = fields.Boolean(metadata=about("True when the car can be booked for the whole period."))
    busy = fields.List(fields.Nested(BusySchema), metadata=about("The bookings that overlap the period, in time order."))
    maintenance = fields.List(fields.Nested(WindowInCalendarSchema), metadata=about(
        "The maintenance windows that overlap the period, in time order."))
    free = fields.List(fields.Nested(SlotSchema), metadata=about(
        "The gaps inside the period where a booking could go, clipped to it: outside every booking and "
        "window and their turnaround; none for a car in maintenance."))


class IndexSchema(Schema):
    """What GET {prefix}/ answers: where to start."""
    name = fields.String(metadata={"description": "The service's name."})
    version = fields.String(metadata={"description": "The API's version."})
    links = fields.Dict(keys=fields.String(), values=fields.String(), metadata={
        "description": "The collections, the available-cars search, and (when mounted) the OpenAPI "
                       "document and the interactive docs, by name."})


class ProblemSchema(Schema):
    """RFC 9457 problem details: the body of every error."""
    title = fields.String(required=True, metadata=about("The HTTP status in words."))
    status = fields.Integer(required=True, metadata=about("The HTTP status code."))
    detail = fields.String(required=True, metadata=about("What was wrong, and how to put it right."))
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()), metadata=about(
        "With 422: each offending field or query parameter, with its messages."))


class PageQuery(Schema):
    """Paging for a list: without `limit`, every item from `offset` on."""
    limit = Count(validate=validate.Range(min=1, max=MAX_PAGE),
                           metadata=about("At most this many items, 1 to 1000; all when left out.", 100))
    offset = Count(load_default=0, validate=validate.Range(min=0),
                            metadata=about("Skip this many items first.", 0))


class CarQuery(PageQuery):
    status = fields.String(validate=validate.OneOf(CAR_STATUSES), metadata=about(
        "Only cars with this status: 'available' or 'maintenance'.", "available"))
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars.", 1))
    brand = fields.String(metadata=about("Only this make, in any case.", "Volkswagen"))


class BookingQuery(EndAfterStart, PageQuery):
    limit = Count(validate=validate.Range(min=1, max=MAX_PAGE), metadata=about(
        f"At most this many bookings, 1 to 1000; {DEFAULT_PAGE} when left out (follow the Link header).", 100))
    car_id = Count(validate=validate.Range(min=1), metadata=about("Only this car's bookings.", 1))
    customer_email = EmailAddress(metadata=about("Only this customer's bookings, in any case.", "ada@example.com"))
    start_datetime = Instant(in_query=True, metadata=about(
        "With end_datetime: bookings that overlap [start, end). Alone: bookings that start at or after it."))
    end_datetime = Instant(in_query=True, metadata=about(
        "With start_datetime: bookings that overlap [start, end). Alone: bookings that end at or before it."))


class WindowQuery(EndAfterStart, Schema):
    start_datetime = Instant(in_query=True, required=True, metadata=about(
        "Start of the period: an ISO 8601 date-time with an offset, or without one for the "
        "dealership's time zone. In a query string write + as %2B."))
    end_datetime = Instant(in_query=True, required=True, metadata=about(
        "End of the period, after its start; the period is [start, end)."))


class AvailableCarsQuery(WindowQuery, PageQuery):
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars.", 1))


class FeedQuery(EndAfterStart, Schema):
    start_datetime = Instant(in_query=True, metadata=about(
        "Events that end after it; 30 days before today (00:00 UTC) when left out."))
    end_datetime = Instant(in_query=True, metadata=about(
        "Events that start before it; 365 days after today (00:00 UTC) when left out."))


class FleetFeedQuery(FeedQuery):
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars.", 1))


class SlotQuery(PageQuery):
    limit = Count(validate=validate.Range(min=1, max=MAX_PAGE), metadata=about(
        f"At most this many slots, 1 to 1000; {DEFAULT_PAGE} when left out (follow the Link header).", 100))
    duration = Duration(required=True, metadata=about(
        "How long the car is needed: an ISO 8601 duration of days, hours and minutes from 15 minutes to "
        "90 days (P3D, PT4H, P1DT12H).", "P3D") | {"pattern": DURATION_PATTERN})
    after = Instant(in_query=True, metadata=about(
        "The earliest start wanted; when left out, or already past, the next whole minute from now."))
    before = Instant(in_query=True, metadata=about(
        "The slot must end by then; `after` plus 90 days when left out."))
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars.", 1))
    brand = fields.String(metadata=about("Only this make, in any case.", "Volkswagen"))
    car_id = Count(validate=validate.Range(min=1), metadata=about("Only this car.", 1))

    @validates_schema
    def before_after_after(self, data, **kwargs):
        after, before = data.get("after"), data.get("before")
        if after is not None and before is not None and before <= after:
            raise ValidationError("Must be after `after`.", field_name="before")


DEALER_SCHEMA = DealerSchema()
DEALER_CHANGES = DealerSchema(partial=True)
WINDOW_SCHEMA = MaintenanceWindowSchema()
QUOTE_SCHEMA = QuoteSchema()
OFFER_SCHEMA = OfferSchema()
SLOT_QUERY = SlotQuery()
FEED_QUERY = FeedQuery()
FLEET_FEED_QUERY = FleetFeedQuery()
CAR_SCHEMA = CarSchema()
CAR_CHANGES = CarSchema(partial=True)
BOOKING_SCHEMA = BookingSchema()
BOOKING_CHANGES = BookingSchema(partial=True)
PROBLEM_SCHEMA = ProblemSchema()
INDEX_SCHEMA = IndexSchema()
CALENDAR_SCHEMA = CalendarSchema()
CAR_QUERY = CarQuery()
PAGE_QUERY = PageQuery()
BOOKING_QUERY = BookingQuery()
WINDOW_QUERY = WindowQuery()
AVAILABLE_CARS_QUERY = AvailableCarsQuery()

# ---------------------------------------------------------------------------------------------
# HTTP helpers and errors: every error is application/problem+json (RFC 9457)
# ---------------------------------------------------------------------------------------------

class Digits(IntegerConverter):
    """A path id, <digits:car_id>: ASCII digits only (Werkzeug's int takes other scripts' digits
    too, so that /cars/１ would be car 1)."""
    regex = r"[0-9]+"


class ServiceBlueprint(Blueprint):
    """The API's blueprint: its URLs are taken as written. Werkzeug would otherwise answer
    POST /api/v1//cars with a redirect to /api/v1/cars on whatever host the request named."""

    def add_url_rule(self, rule, endpoint=None, view_func=None, **options):
        options.setdefault("merge_slashes", False)
        super().add_url_rule(rule, endpoint, view_func, **options)


bp = ServiceBlueprint(EXTENSION, __name__)


def problem(status, title, detail, errors=None):
    body = {"title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return json_text(to_json(PROBLEM_SCHEMA.dump(body)), status, mimetype="application/problem+json")


def http_error(error):
    """Any werkzeug HTTPException as problem+json, keeping its headers (Allow, WWW-Authenticate)."""
    response = problem(error.code, error.name, error.description)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers.add(name, value)
    return response


def validation_error(error):
    """422 listing each offending field with its messages: at most MAX_ERRORS of them (a body of a
    million unknown keys must not come back three times as large), and how many more there were."""
    messages = error.messages if isinstance(error.messages, dict) else {error.field_name: error.messages}
    names = sorted(messages, key=str)
    shown = {name: messages[name] for name in names[:MAX_ERRORS]}
    more = f" and {len(names) - MAX_ERRORS} more" if len(names) > MAX_ERRORS else ""
    return problem(422, "Unprocessable Content", f"Invalid input: {', '.join(map(str, shown))}{more}.", shown)


# By code as well as by class: Flask looks a handler up by code first, in the blueprint and then in
# the app, so a host's own 404 page would otherwise answer for the service's routes.
for code in default_exceptions:
    bp.register_error_handler(code, http_error)
bp.register_error_handler(HTTPException, http_error)
bp.register_error_handler(ValidationError, validation_error)


def needs_key(method, view):
    """With DEALERSHIP_API_KEY set: every write needs it, and so do the reads of bookings, which hold
    customers' names and e-mail addresses. Cars, dealers, available-cars and calendars stay open."""
    return method in WRITE_METHODS or view.api_doc["personal"]


def key_required():
    """Whether the request being handled must carry the API key."""
    view = current_app.view_functions.get(request.endpoint)
    return bool(current_app.config["DEALERSHIP_API_KEY"]) and view is not None and needs_key(request.method, view)


@bp.before_request
def require_api_key():
    """With DEALERSHIP_API_KEY set, a request that needs it must carry it as a Bearer token."""
    key = current_app.config["DEALERSHIP_API_KEY"]
    if not key or not key_required():
        return
    auth = request.authorization
    token = auth.token if auth is not None and auth.type == "bearer" and auth.token else ""
    if hmac.compare_digest(token.encode(), key.encode()):
        return
    current_app.extensions[REFUSALS].note(request.remote_addr, request.method, request.path)
    what = "changes data" if request.method in WRITE_METHODS else "reads customers' names and e-mail addresses"
    raise Unauthorized(f"{'The API key does not match' if token else 'No API key was sent'}: this request "
                       f"{what}, so send 'Authorization: Bearer <API key>'.",
                       www_authenticate=WWWAuthenticate("bearer", {"realm": "dealership"}))


class Refusals:
    """Refused API keys, logged as warnings with the client's address, method and path (never the
    key), at most one line per address a minute, so that a guesser cannot fill the log."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last = {}  # address -> when its last refusal was logged

    def note(self, address, method, path, every=60.0):
        now = time.monotonic()
        with self.lock:
            if now - self.last.get(address, -every) < every:
                return
            if len(self.last) > 10_000:  # forget those not seen for a minute
                self.last = {a: t for a, t in self.last.items() if now - t < every}
            self.last[address] = now
        log.warning("refused API key from %s: %s %s", address, method, path)


@bp.before_request
def catch_up():
    """Answer from dicts that hold what every process has committed. A POST or DELETE reads
    nothing before its own write transaction, which catches up in any case (a route that does read
    first calls sync itself)."""
    if request.method not in ("POST", "DELETE"):
        store().sync()


def json_body():
    """The request body as a JSON object, or a 415/413/400 that says what was wrong."""
    limit = request.max_content_length = current_app.config["DEALERSHIP_MAX_CONTENT_LENGTH"]
    if not request.is_json:
        raise UnsupportedMediaType("Send the body as JSON with 'Content-Type: application/json'.")
    try:
        body = request.get_json()
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(f"The body is larger than the limit of {limit} bytes.") from None
    except BadRequest:
        raise BadRequest("The body is not valid JSON.") from None
    except RecursionError:  # arrays or objects nested hundreds deep: no field of ours is
        raise BadRequest("The body is not valid JSON for this service: it is nested too deeply.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def query(schema):
    """The query string, validated by `schema`; a bad, unknown or repeated parameter is a 422."""
    repeated = {name: ["Given more than once: give it once."] for name, values in request.args.lists()
                if len(values) > 1}
    if repeated:
        raise ValidationError(repeated)
    return schema.load(request.args.to_dict())


# A date-time written in full with an offset, as clients and the docs' examples write it.
FULL_DATETIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")


def full_instant(text):
    """A date-time written in full with an offset, read at once as UTC; None for anything else, which
    the schema then reads (and says what is wrong with). Years 2 to 9998 only: writable in any zone."""
    if text and FULL_DATETIME.fullmatch(text):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:  # a day or hour that does not exist: the schema says which
            return None
        if 1 < moment.year < 9999:
            return moment.astimezone(timezone.utc)
    return None


def given_once(*names):
    """True when the query string has exactly these parameters, each once."""
    args = request.args
    return len(args) == len(names) and all(len(args.getlist(name)) == 1 for name in names)


# The common searches and the common new booking, read without the schema: the result is the same
# either way (tests compare the two on many inputs), and the schema holds every rule and its message
# for the rest.

def window_query(schema):
    """A search for a period: just start_datetime and end_datetime, written in full with offsets."""
    if given_once("start_datetime", "end_datetime"):
        start, end = full_instant(request.args["start_datetime"]), full_instant(request.args["end_datetime"])
        if start is not None and end is not None and start < end:
            return {"start_datetime": start, "end_datetime": end, "offset": 0}
    return query(schema)


def slot_query():
    """A search for slots: just duration and after, written in full with an offset."""
    if given_once("duration", "after"):
        length, after = parse_duration(request.args["duration"]), full_instant(request.args["after"])
        if length is not None and MIN_SLOT <= length <= MAX_SLOT and after is not None:
            return {"offset": 0, "duration": length, "after": after}
    return query(SLOT_QUERY)


def booking_body():
    """A new booking: just its five fields, car_id a whole number, customer_name printable ASCII,
    an e-mail address email-validator takes, and date-times written in full with offsets."""
    body = json_body()
    if body.keys() == BOOKING_FIELDS_SENT:
        car_id, name, email = body["car_id"], body["customer_name"], body["customer_email"]
        start, end = body["start_datetime"], body["end_datetime"]
        if type(car_id) is int and car_id >= 1 and type(name) is str and name.isascii() and name.isprintable() \
                and 0 < len(name.strip()) <= MAX_NAME and type(email) is str and type(start) is str \
                and type(end) is str:
            start, end = full_instant(start), full_instant(end)
            try:
                email = normalized_email(email)
            except email_validator.EmailNotValidError:
                email = None
            if start is not None and end is not None and start < end and email and len(email) <= MAX_EMAIL:
                return {"car_id": car_id, "customer_name": name.strip(), "customer_email": email,
                        "start_datetime": start, "end_datetime": end}
    return BOOKING_SCHEMA.load(body)


def paged(items, filters):
    """The page of `items` that `limit` and `offset` ask for (all from `offset` on without a limit),
    and its headers."""
    offset, limit = filters["offset"], filters.get("limit")
    page = items[offset:None if limit is None else offset + limit]
    return page, page_headers(len(items), offset, limit)


def page_headers(total, offset, limit):
    """X-Total-Count, the number of items before paging, and, for a page, an RFC 8288 Link to the
    next and previous pages with the same filters (as a path, never naming a host)."""
    headers = {"X-Total-Count": str(total)}
    if limit is None:
        return headers
    links = []
    for rel, start in (("next", offset + limit), ("prev", max(0, offset - limit))):
        if (rel == "next" and start < total) or (rel == "prev" and offset > 0):
            args = request.args.to_dict() | {"offset": str(start), "limit": str(limit)}
            links.append(f'<{request.path}?{urlencode(args)}>; rel="{rel}"')
    if links:
        headers["Link"] = ", ".join(links)
    return headers


def offers_json(slots, length):
    """Slots, (start in micros, car) each, as the JSON (bytes) that OFFER_SCHEMA writes, made directly:
    a search answers one per car, and most share a start and a daily price, so each instant is
    written and each price computed once, and each car's opening is kept (a test compares the two
    on many inputs)."""
    service = store()
    show, currency, openings = service.show, to_json(service.currency).encode(), service.offer_openings
    prices, parts, seen = {}, [], None
    for start, car in slots:
        if start != seen:  # slots come by start: a run of equal starts shares its text
            seen, moment, ends = start, EPOCH + start * MICROSECOND, {}
            times = (f',"start_datetime":{to_json(show(moment))},"end_datetime":'
                     f'{to_json(show(moment + length))},"total_price":').encode()
        end = ends.get(car.daily_price)
        if end is None:
            price = prices.get(car.daily_price)
            if price is None:
                price = prices[car.daily_price] = to_json(
                    price_cents(car.daily_price, moment, moment + length) / 100).encode()
            end = ends[car.daily_price] = times + price + b',"currency":' + currency + b"}"
        opening = openings.get(car.id)
        if opening is None:
            opening = openings[car.id] = b'{"car_id":%d' % car.id
        parts.append(opening + end)
    return parts


def booking_json(booking):
    """A booking as the JSON text that BOOKING_SCHEMA writes, made directly: the answer to every
    booking made, read or changed one at a time (a test compares the two on many inputs)."""
    service = store()
    return (f'{{"id":{booking.id},"car_id":{booking.car_id},"customer_name":{to_json(booking.customer_name)},'
            f'"customer_email":{to_json(booking.customer_email)},'
            f'"start_datetime":"{service.show(booking.start_datetime)}",'
            f'"end_datetime":"{service.show(booking.end_datetime)}",'
            f'"total_price":{to_json(booking.total_cents / 100)},"currency":{to_json(service.currency)}}}')


def created_at(record_id):
    """The Location of a record just made by a POST to a collection at the top of the API (whose path
    has no id in it, to be written one way): the collection's URL, as url_for writes it (the script
    root as it is, the path quoted), then the id. A test compares the two."""
    return {"Location": f"{request.script_root}{url_quote(request.path, safe=URL_PATH_SAFE)}/{record_id}"}


def no_content():
    """204 with no body and so no Content-Type."""
    response = Response(status=204)
    del response.headers["Content-Type"]
    return response


def json_text(text, status=200, headers=None, mimetype="application/json"):
    """A response from a body that is already JSON (text or bytes). Every body the service writes
    ends with one newline, as curl users expect."""
    newline = "\n" if isinstance(text, str) else b"\n"
    return Response(text if text.endswith(newline) else text + newline, status, headers, mimetype=mimetype)


def json_response(data, status=200, headers=None):
    """A response from data a schema dumped, in the schema's field order (the id first)."""
    return json_text(to_json(data), status, headers)


def json_list(parts, headers=None):
    """A JSON array response from items that are already JSON (bytes)."""
    return json_text(json_array(parts), headers=headers)


def api_doc(tag, *, returns=None, many=False, status=200, body=None, query=None, errors=(), headers=(),
            personal=False, media=None):
    """Record what the OpenAPI document says of a route: the schemas are the ones the route uses.

    Errors that follow from the route's shape are added by the document itself: 404 for a path id,
    400/413/415/422 for a body, 422 for a query, 401 for a write or a `personal` read (see needs_key).
    A route that answers another media type than JSON (`media`) answers text, with an ETag.
    """
    def attach(view):
        view.api_doc = {"tag": tag, "returns": returns, "many": many, "status": status, "body": body,
                        "query": query, "errors": errors, "headers": headers, "personal": personal, "media": media}
        return view
    return attach


# ---------------------------------------------------------------------------------------------
# Routes: the API's front door
# ---------------------------------------------------------------------------------------------


@bp.get("/", strict_slashes=False)
@api_doc("service", returns=INDEX_SCHEMA)
def index():
    """Where to start

    The collections, the search for free cars and, when mounted, the docs.
    """
    links = {"cars": url_for(".list_cars"), "bookings": url_for(".list_bookings"),
             "available_cars": url_for(".available_cars"), "available_slots": url_for(".available_slots"),
             "dealers": url_for(".list_dealers")}
    if DOCS in current_app.extensions:
        links |= {"openapi": url_for(f"{docs_bp.name}.openapi_json"), "docs": docs_url()}
    return json_response(INDEX_SCHEMA.dump({"name": "Dealership API", "version": API_VERSION, "links": links}))


# ---------------------------------------------------------------------------------------------
# Routes: dealers
# ---------------------------------------------------------------------------------------------


@bp.get("/dealers")
@api_doc("dealers", returns=DEALER_SCHEMA, many=True, headers=["X-Total-Count"])
def list_dealers():
    """List the dealers

    Ordered by id.
    """
    dealers = list(store().dealers.values())
    return json_response(DEALER_SCHEMA.dump(dealers, many=True), headers={"X-Total-Count": str(len(dealers))})


@bp.post("/dealers")
@api_doc("dealers", returns=DEALER_SCHEMA, status=201, body=DEALER_SCHEMA, headers=["Location"])
def create_dealer():
    """Add a dealer"""
    dealer = store().add_dealer(DEALER_SCHEMA.load(json_body()))
    return json_response(DEALER_SCHEMA.dump(dealer), 201, created_at(dealer.id))


@bp.get("/dealers/<digits:dealer_id>")
@api_doc("dealers", returns=DEALER_SCHEMA)
def get_dealer(dealer_id):
    """Get one dealer"""
    return json_response(DEALER_SCHEMA.dump(store().dealer(dealer_id)))


@bp.patch("/dealers/<digits:dealer_id>")
@api_doc("dealers", returns=DEALER_SCHEMA, body=DEALER_CHANGES)
def update_dealer(dealer_id):
    """Change a dealer

    Only the fields given change. A new turnaround applies to bookings and maintenance windows made or
    moved from then on; the ones that exist stay valid.
    """
    store().dealer(dealer_id)
    changes = DEALER_CHANGES.load(json_body())
    return json_response(DEALER_SCHEMA.dump(store().update_dealer(dealer_id, changes)))


@bp.delete("/dealers/<digits:dealer_id>")
@api_doc("dealers", status=204, errors=[409])
def delete_dealer(dealer_id):
    """Remove a dealer

    Only a dealer that has no cars.
    """
    store().delete_dealer(dealer_id)
    return no_content()


# ---------------------------------------------------------------------------------------------
# Routes: cars
# ---------------------------------------------------------------------------------------------


@bp.post("/cars")
@api_doc("cars", returns=CAR_SCHEMA, status=201, body=CAR_SCHEMA, errors=[404, 409], headers=["Location"])
def create_car():
    """Add a car to the inventory"""
    car = store().add_car(CAR_SCHEMA.load(json_body()))
    return json_text(car.json, 201, created_at(car.id))


@bp.get("/cars")
@api_doc("cars", returns=CAR_SCHEMA, many=True, query=CAR_QUERY, headers=["X-Total-Count", "Link"])
def list_cars():
    """List the cars

    Ordered by id, optionally filtered by status, dealer and brand, and paged.
    """
    if not request.args:  # the whole fleet: ready made
        body, total = store().cars_json()
        return json_text(body, headers={"X-Total-Count": str(total)})
    filters = query(CAR_QUERY)
    status, dealer_id = filters.get("status"), filters.get("dealer_id")
    brand = filters.get("brand", "").strip().casefold()
    cars = [car for car in list(store().cars.values())
            if (status is None or car.status == status)
            and (dealer_id is None or car.dealer_id == dealer_id)
            and (not brand or car.brand.casefold() == brand)]
    page, headers = paged(cars, filters)
    return json_list([car.json for car in page], headers)


@bp.get("/cars/<digits:car_id>")
@api_doc("cars", returns=CAR_SCHEMA)
def get_car(car_id):
    """Get one car"""
    return json_text(store().car(car_id).json)


@bp.route("/cars/<digits:car_id>", methods=["PUT", "PATCH"])
@api_doc("cars", returns=CAR_SCHEMA, body=CAR_CHANGES, errors=[409])
def update_car(car_id):
    """Change a car

    Only the fields given change; the others keep their values.
    """
    store().car(car_id)  # an unknown car is a 404 before its body is judged
    changes = CAR_CHANGES.load(json_body())
    return json_text(store().update_car(car_id, changes).json)


@bp.delete("/cars/<digits:car_id>")
@api_doc("cars", status=204, errors=[409])
def delete_car(car_id):
    """Remove a car

    Only a car that has no bookings.
    """
    store().delete_car(car_id)
    return no_content()


@bp.get("/cars/<digits:car_id>/availability")
@api_doc("cars", returns=CALENDAR_SCHEMA, query=WINDOW_QUERY)
def car_availability(car_id):
    """See when a car is busy or free

    The bookings and maintenance windows that overlap the period, and the gaps inside it where a
    booking could go (with the dealer's turnaround kept free around each entry).
    """
    store().car(car_id)
    window = query(WINDOW_QUERY)
    start, end = window["start_datetime"], window["end_datetime"]
    car, entries, free, available = store().calendar(car_id, start, end)
    return json_response(CALENDAR_SCHEMA.dump({
        "car_id": car.id, "start_datetime": start, "end_datetime": end, "status": car.status,
        "turnaround_minutes": store().dealers[car.dealer_id].turnaround_minutes, "available": available,
        "busy": [entry for entry in entries if type(entry) is Booking],
        "maintenance": [entry for entry in entries if type(entry) is MaintenanceWindow],
        "free": [{"start_datetime": s, "end_datetime": e} for s, e in free],
    }))


@bp.get("/cars/<digits:car_id>/quote")
@api_doc("cars", returns=QUOTE_SCHEMA, query=WINDOW_QUERY)
def quote(car_id):
    """Price a booking

    What booking the car for the period would cost now, and whether it can be booked; nothing is booked.
    """
    store().car(car_id)
    window = query(WINDOW_QUERY)
    return json_response(QUOTE_SCHEMA.dump(store().quote(car_id, window["start_datetime"], window["end_datetime"])))


# ---------------------------------------------------------------------------------------------
# Routes: maintenance windows
# ---------------------------------------------------------------------------------------------


@bp.get("/cars/<digits:car_id>/maintenance-windows")
@api_doc("maintenance", returns=WINDOW_SCHEMA, many=True, query=PAGE_QUERY, headers=["X-Total-Count", "Link"])
def list_windows(car_id):
    """List a car's maintenance windows

    In time order, past ones included.
    """
    filters = query(PAGE_QUERY)
    page, headers = paged(store().car_windows(car_id), filters)
    return json_response(WINDOW_SCHEMA.dump(page, many=True), headers=headers)


@bp.post("/cars/<digits:car_id>/maintenance-windows")
@api_doc("maintenance", returns=WINDOW_SCHEMA, status=201, body=WINDOW_SCHEMA, errors=[409], headers=["Location"])
def create_window(car_id):
    """Take a car out of service for a period

    No booking can be made over the window, nor within the dealer's turnaround of it. The window may
    not overlap a booking or another window: the 409 names the bookings in the way.
    """
    store().sync()  # unlike other POSTs, this one reads before it writes (see catch_up)
    store().car(car_id)  # an unknown car is a 404 before its body is judged
    window = store().add_window(car_id, WINDOW_SCHEMA.load(json_body()))
    return json_response(WINDOW_SCHEMA.dump(window), 201,
                         {"Location": url_for(".get_window", car_id=car_id, window_id=window.id)})


@bp.get("/cars/<digits:car_id>/maintenance-windows/<digits:window_id>")
@api_doc("maintenance", returns=WINDOW_SCHEMA)
def get_window(car_id, window_id):
    """Get one maintenance window"""
    return json_response(WINDOW_SCHEMA.dump(store().window(car_id, window_id)))


@bp.delete("/cars/<digits:car_id>/maintenance-windows/<digits:window_id>")
@api_doc("maintenance", status=204)
def delete_window(car_id, window_id):
    """Remove a maintenance window

    Its time can be booked again.
    """
    store().delete_window(car_id, window_id)
    return no_content()


# ---------------------------------------------------------------------------------------------
# Routes: bookings
# ---------------------------------------------------------------------------------------------


@bp.post("/bookings")
@api_doc("bookings", returns=BOOKING_SCHEMA, status=201, body=BOOKING_SCHEMA, errors=[404, 409],
         headers=["Location"])
def create_booking():
    """Book a car

    For the period from start_datetime up to end_datetime: it must not overlap another booking of
    the car, nor start in the past.
    """
    booking = store().add_booking(booking_body())
    return json_text(booking_json(booking), 201, created_at(booking.id))


@bp.get("/bookings")
@api_doc("bookings", returns=BOOKING_SCHEMA, many=True, query=BOOKING_QUERY, headers=["X-Total-Count", "Link"],
         personal=True)
def list_bookings():
    """List the bookings

    Ordered by start then id, filtered by car, customer and period, and paged.
    """
    filters = query(BOOKING_QUERY)
    offset, limit = filters["offset"], filters.get("limit", DEFAULT_PAGE)
    page, total = store().find_bookings(offset, limit, filters.get("car_id"), filters.get("start_datetime"),
                                        filters.get("end_datetime"), filters.get("customer_email"))
    return json_response(BOOKING_SCHEMA.dump(page, many=True), headers=page_headers(total, offset, limit))


@bp.get("/bookings/<digits:booking_id>")
@api_doc("bookings", returns=BOOKING_SCHEMA, personal=True)
def get_booking(booking_id):
    """Get one booking"""
    return json_text(booking_json(store().booking(booking_id)))


@bp.patch("/bookings/<digits:booking_id>")
@api_doc("bookings", returns=BOOKING_SCHEMA, body=BOOKING_CHANGES, errors=[409])
def change_booking(booking_id):
    """Move or edit a booking

    In one step: on any error the booking stays exactly as it was.
    """
    store().booking(booking_id)
    changes = BOOKING_CHANGES.load(json_body())
    return json_text(booking_json(store().change_booking(booking_id, changes)))


@bp.delete("/bookings/<digits:booking_id>")
@api_doc("bookings", status=204)
def cancel_booking(booking_id):
    """Cancel a booking

    Its time is free again.
    """
    store().cancel_booking(booking_id)
    return no_content()


@bp.get("/bookings/available-cars")
@api_doc("bookings", returns=CAR_SCHEMA, many=True, query=AVAILABLE_CARS_QUERY,
         headers=["X-Total-Count", "Link"])
def available_cars():
    """Find the cars free for a whole period

    Cars whose status is available and that have no booking overlapping the period, ordered by id.
    """
    filters = window_query(AVAILABLE_CARS_QUERY)
    if "limit" not in filters and not filters["offset"]:  # the whole answer, joined from ready parts
        body, total = store().free_cars_json(filters["start_datetime"], filters["end_datetime"],
                                             filters.get("dealer_id"))
        return json_text(body, headers={"X-Total-Count": str(total)})
    cars = store().free_cars(filters["start_datetime"], filters["end_datetime"], filters.get("dealer_id"))
    page, headers = paged(cars, filters)
    return json_list([car.json for car in page], headers)


@bp.get("/bookings/available-slots")
@api_doc("bookings", returns=OFFER_SCHEMA, many=True, query=SLOT_QUERY, headers=["X-Total-Count", "Link"])
def available_slots():
    """Find when a car is free for a duration

    For each car that can be booked and matches the filters, the earliest period of the duration that
    starts at or after `after` and ends by `before` with the dealer's turnaround kept free around it;
    ordered by start, then car id. Cars with no such period are left out. Booking a slot succeeds
    unless someone else takes it first.
    """
    filters = slot_query()
    now = datetime.now(timezone.utc)
    now = now.replace(second=0, microsecond=0) + timedelta(minutes=1)  # a start people can read
    after = min(max(filters.get("after", now), now), LATEST_SLOT_END)
    before = min(filters["before"] if "before" in filters else after + MAX_SLOT, LATEST_SLOT_END)
    offset, limit = filters["offset"], filters.get("limit", DEFAULT_PAGE)
    page, total = store().free_slots(filters["duration"], after, before, offset, limit, filters.get("dealer_id"),
                                     filters.get("brand"), filters.get("car_id"))
    return json_list(offers_json(page, filters["duration"]), page_headers(total, offset, limit))


# ---------------------------------------------------------------------------------------------
# Routes: calendar feeds (iCalendar), for the calendar programs staff already use
# ---------------------------------------------------------------------------------------------

FEED_PAST, FEED_AHEAD = timedelta(days=30), timedelta(days=365)


@bp.get("/cars/<digits:car_id>/calendar.ics")
@api_doc("cars", query=FEED_QUERY, media="text/calendar")
def car_feed(car_id):
    """Subscribe to a car's calendar

    An iCalendar feed of the car's bookings and maintenance windows, from 30 days ago to 365 days
    ahead unless a period is given; no customer's name or e-mail.
    """
    car = store().car(car_id)
    start, end = feed_period(query(FEED_QUERY))
    return feed(f"{car.brand} {car.model} (car {car.id})", store().entries(start, end, car_id=car_id))


@bp.get("/calendar.ics")
@api_doc("cars", query=FLEET_FEED_QUERY, media="text/calendar", errors=[404])
def fleet_feed():
    """Subscribe to the fleet's calendar

    An iCalendar feed of every car's bookings and maintenance windows (or one dealer's), from 30 days
    ago to 365 days ahead unless a period is given; no customer's name or e-mail.
    """
    filters = query(FLEET_FEED_QUERY)
    dealer_id = filters.get("dealer_id")
    name = "Fleet" if dealer_id is None else store().dealer(dealer_id).name
    start, end = feed_period(filters)
    return feed(name, store().entries(start, end, dealer_id=dealer_id))


def feed_period(filters):
    """The period a feed covers: as asked, or from 30 days ago to 365 days ahead, counted from
    today's midnight (UTC), so that the feed stays the same all day while nothing changes."""
    today = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return filters.get("start_datetime", today - FEED_PAST), filters.get("end_datetime", today + FEED_AHEAD)


def feed(name, entries):
    """An iCalendar (RFC 5545) feed of (car, entry) pairs, with an ETag: a calendar program that polls
    gets 304 Not Modified while nothing in it changed. One VEVENT per entry, its UID stable (made from
    the entry's kind and id), its times in UTC; DTSTAMP is today's midnight (UTC)."""
    stamp = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//Dealership API//EN")
    calendar.add("version", "2.0")
    calendar.add("x-wr-calname", f"Dealership: {name}")
    for car, entry in entries:
        event = icalendar.Event()
        if type(entry) is Booking:
            event.add("uid", f"booking-{entry.id}@dealership")
            event.add("summary", f"Booked: {car.brand} {car.model} (booking {entry.id})")
        else:
            event.add("uid", f"maintenance-window-{entry.id}@dealership")
            event.add("summary", f"Maintenance: {entry.note or 'workshop'} ({car.brand} {car.model})")
        event.add("dtstamp", stamp)
        event.add("dtstart", entry.start_datetime)
        event.add("dtend", entry.end_datetime)
        event.add("categories", ["Booking" if type(entry) is Booking else "Maintenance"])
        calendar.add_component(event)
    response = Response(calendar.to_ical(), mimetype="text/calendar", headers={"Cache-Control": "no-cache"})
    response.add_etag()
    return response.make_conditional(request)


# ---------------------------------------------------------------------------------------------
# The OpenAPI document, made from the routes' own schemas, and the interactive docs
# ---------------------------------------------------------------------------------------------

API_DESCRIPTION = """A car dealership's inventory and booking service.

Date-times are ISO 8601. A value with an offset (`Z`, `+02:00`) is that instant; a value without one is
local time in the dealership's zone (`DEALERSHIP_TIMEZONE`, UTC unless set), and responses carry that
zone's offset. Booking intervals are half-open, `[start, end)`: a booking that ends at 10:00 and another
that starts at 10:00 on the same car do not overlap, while one second of overlap is a 409. `end_datetime`
must be after `start_datetime`, and a booking cannot start in the past. Every error is
`application/problem+json`.

Start with **POST /api/v1/cars**, then **POST /api/v1/bookings**: press "Try it out" and Execute, and
the examples filled in create a car and book it for a week from now."""

ERROR_MEANINGS = {
    400: "The body is not valid JSON, or not a JSON object.",
    401: "DEALERSHIP_API_KEY is set and the request does not carry it as 'Authorization: Bearer <key>' "
         "(every write, and the reads of bookings).",
    404: "No such resource, or a car or dealer that the body names does not exist.",
    409: "A clash with the stored data; `detail` names what it clashes with.",
    413: "The body is larger than DEALERSHIP_MAX_CONTENT_LENGTH.",
    415: "The body is not sent as application/json.",
    422: "A field or query parameter is invalid, missing or unknown; `errors` lists each.",
    429: "Too many refused API keys (or, with DEALERSHIP_RATE_LIMIT, requests) from this address; "
         "retry after `Retry-After`.",
    503: "The database refused the write (busy, read-only or full); nothing changed. Retry after `Retry-After`.",
}
# The operations in the order a newcomer needs them: a car must exist before it can be booked.
TAGS = {"cars": "The inventory: add, list, change and remove cars, see when one is busy or free, price a booking.",
        "bookings": "Book a car for a period, find the cars free for a period or the earliest free slot, move or "
                    "cancel a booking.",
        "maintenance": "Take a car out of service for a period: no booking can be made over it.",
        "dealers": "The dealers that own the cars, and the turnaround their cars need between bookings.",
        "service": "Where to start."}
# What the example of a change (PUT/PATCH) shows: what a user would change first. A test loads
# every example through its schema, so a renamed field cannot leave one behind.
CHANGE_EXAMPLES = {"Car": lambda window: {"color": "Red", "daily_price": 69.9},
                   "Dealer": lambda window: {"turnaround_minutes": 60},
                   "Booking": lambda window: {"end_datetime": window["end_datetime"] + timedelta(days=1)}}
RESPONSE_HEADERS = {
    "Location": {"description": "The URL of the new resource.", "required": True, "schema": {"type": "string"}},
    "X-Total-Count": {"description": "The number of items before paging.", "required": True,
                      "schema": {"type": "integer", "minimum": 0}},
    "ETag": {"description": "The version of the feed: send it back in If-None-Match to get 304 when "
                            "nothing changed.", "required": True, "schema": {"type": "string"}},
    "Link": {"description": "With a page (always for bookings and slots, with `limit` for the others): RFC 8288 links "
                            "to the next and previous pages, with the same filters.",
             "schema": {"type": "string"}},
}
_PATH_ARGUMENT = re.compile(r"<(?:\w+:)?(\w+)>")
_PATH_TEMPLATE = re.compile(r"{(\w+)}")


def schema_name(schema):
    """Component names: Car for CarSchema, CarChanges for CarSchema(partial=True)."""
    cls = schema if isinstance(schema, type) else type(schema)
    name = cls.__name__.removesuffix("Schema")
    return name + "Changes" if getattr(schema, "partial", False) else name


def openapi_document(app):
    """The OpenAPI 3 document of the service's routes as mounted on `app` (in a request to it: the
    examples are written in its dealership's time zone)."""
    spec = APISpec(title="Dealership API", version=API_VERSION, openapi_version="3.0.3",
                   info={"description": API_DESCRIPTION},
                   plugins=[MarshmallowPlugin(schema_name_resolver=schema_name)])
    for name, description in TAGS.items():
        spec.tag({"name": name, "description": description})
    spec.components.schema("Problem", schema=ProblemSchema)
    secured = bool(app.config["DEALERSHIP_API_KEY"])
    if secured:
        spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    examples = Examples(example_window(store().zone))
    rules = [rule for rule in app.url_map.iter_rules() if rule.endpoint.partition(".")[0] == bp.name]
    rules.sort(key=lambda r: (list(TAGS).index(app.view_functions[r.endpoint].api_doc["tag"]), r.rule))
    paths = {}
    for rule in rules:
        view = app.view_functions[rule.endpoint]
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        paths.setdefault(_PATH_ARGUMENT.sub(r"{\1}", rule.rule), {}).update(
            {method.lower(): operation(view, method, rule, secured, len(methods) > 1, examples,
                                       bool(app.config["DEALERSHIP_RATE_LIMIT"]))
             for method in methods})
    add_links(paths)
    for path, operations in paths.items():
        spec.path(path=path, operations=operations)
    document = spec.to_dict()
    window = examples.window
    moments = window | {"after": window["start_datetime"], "before": window["start_datetime"] + timedelta(days=30)}
    for operations in document["paths"].values():  # a query parameter's example beside its description
        for op in operations.values():
            for parameter in op["parameters"]:
                if parameter["in"] == "query":
                    moment = moments.get(parameter["name"])
                    example = parameter["schema"].pop("example", None)
                    parameter["example"] = example if moment is None else moment.isoformat()
    return document


def example_window(zone):
    """The period every example uses: a week ahead of today, 09:00 to 09:00 two days later, in the
    dealership's zone (so it is never in the past and is written with the zone's offset)."""
    start = datetime.now(zone).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=7)
    return {"start_datetime": start, "end_datetime": start + timedelta(days=2)}


class Examples:
    """Examples that look like what the service says, made from the schemas it says it with: a
    request body from each field's own example, a response by dumping that through its schema."""

    def __init__(self, window):
        self.window = window
        car = {"id": 1} | self.body(CAR_SCHEMA)
        start, end = window["start_datetime"], window["end_datetime"]
        price = price_cents(car["daily_price"], start, end)
        booking = {"id": 1} | self.body(BOOKING_SCHEMA) | window | {"total_cents": price}
        workshop = {"id": 1, "car_id": 1, "note": "Brake check", "start_datetime": end + timedelta(days=1),
                    "end_datetime": end + timedelta(days=1, hours=4)}
        self.responses = {
            CarSchema: CAR_SCHEMA.dump(car),
            BookingSchema: BOOKING_SCHEMA.dump(booking),
            DealerSchema: DEALER_SCHEMA.dump({"id": 1} | SEED_DEALER | {"turnaround_minutes": 60}),
            CalendarSchema: CALENDAR_SCHEMA.dump({
                "car_id": 1, "start_datetime": start - timedelta(days=1), "end_datetime": end + timedelta(days=2),
                "status": "available", "turnaround_minutes": 60, "available": False, "busy": [booking],
                "maintenance": [workshop],
                "free": [{"start_datetime": start - timedelta(days=1), "end_datetime": start - timedelta(hours=1)},
                         {"start_datetime": end + timedelta(hours=1), "end_datetime": end + timedelta(hours=23)},
                         {"start_datetime": end + timedelta(days=1, hours=5),
                          "end_datetime": end + timedelta(days=2)}]}),
            MaintenanceWindowSchema: WINDOW_SCHEMA.dump(workshop),
            QuoteSchema: QUOTE_SCHEMA.dump({"car_id": 1, "days": rental_days(start, end), "total_cents": price,
                                            "daily_price": car["daily_price"], "available": True} | window),
            OfferSchema: OFFER_SCHEMA.dump({"car_id": 1, "total_cents": price} | window),
            IndexSchema: INDEX_SCHEMA.dump({"name": "Dealership API", "version": API_VERSION, "links": {
                "cars": f"{API_PREFIX}/cars", "bookings": f"{API_PREFIX}/bookings"}}),
        }
        vin_error = CAR_SCHEMA.fields["vin"].error
        show = store().show
        self.problems = {code: {"title": title, "status": code, "detail": detail} | extra for code, title, detail, extra in [
            (400, "Bad Request", "The body is not valid JSON.", {}),
            (401, "Unauthorized", "No API key was sent: this request changes data, so send "
                                  "'Authorization: Bearer <API key>'.", {}),
            (404, "Not Found", "There is no car with id 7.", {}),
            (409, "Conflict", f"Car 1 is already booked from {show(start)} to {show(end)} by booking 1.", {}),
            (413, "Request Entity Too Large", "The body is larger than the limit of 1048576 bytes.", {}),
            (415, "Unsupported Media Type", "Send the body as JSON with 'Content-Type: application/json'.", {}),
            (422, "Unprocessable Content", "Invalid input: vin.", {"errors": {"vin": [vin_error]}}),
            (429, "Too Many Requests", "Too many refused API keys from this address: wait before trying again.", {}),
            (503, "Service Unavailable", "The database is busy: another process held it for longer than "
                                         "DEALERSHIP_BUSY_TIMEOUT. Nothing was changed; try again.", {}),
        ]}

    def body(self, schema):
        """A request body for `schema`, each value from its field (a date-time from the window)."""
        if schema.partial:
            values = CHANGE_EXAMPLES[schema_name(type(schema))](self.window)
        else:
            values = {name: self.window[name] if isinstance(field, Instant) else field.metadata["example"]
                      for name, field in schema.load_fields.items()}
        return {name: value.isoformat() if isinstance(value, datetime) else value for name, value in values.items()}

    def response(self, schema, many):
        example = self.responses[type(schema)]
        return [example] if many else example


def add_links(paths):
    """Link each 201 of a POST to the operations on the resource it made ({collection}/{id}...),
    so that clients and stateful fuzzers can follow the new id (and the ids the POST's own path named)."""
    for path, operations in paths.items():
        created = operations.get("post", {}).get("responses", {}).get("201")
        if created is None:
            continue
        given = _PATH_TEMPLATE.findall(path)
        for item_path, item_operations in paths.items():
            names = _PATH_TEMPLATE.findall(item_path)
            if item_path.startswith(path + "/{") and len(names) == len(given) + 1:
                parameters = {name: f"$request.path.{name}" for name in given} | {names[-1]: "$response.body#/id"}
                created.setdefault("links", {}).update({
                    op["operationId"]: {"operationId": op["operationId"], "parameters": parameters}
                    for op in item_operations.values()})


def operation(view, method, rule, secured, shared, examples, limited):
    doc = view.api_doc
    summary, _, description = inspect.cleandoc(view.__doc__ or "").partition("\n")
    op = {"tags": [doc["tag"]], "summary": summary,
          "operationId": f"{view.__name__}_{method.lower()}" if shared else view.__name__,
          "parameters": [{"in": "path", "name": name, "required": True, "schema": {"type": "integer", "minimum": 1}}
                         for name in sorted(rule.arguments)],
          "responses": {}}
    if description.strip():
        op["description"] = description.strip()
    errors = set(doc["errors"])
    if rule.arguments:
        errors.add(404)
    if doc["query"] is not None:
        op["parameters"].append({"in": "query", "schema": doc["query"]})
        errors.add(422)
    if doc["body"] is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": doc["body"], "example": examples.body(doc["body"])}}}
        errors.update((400, 413, 415, 422))
    if method in WRITE_METHODS:
        errors.add(503)
    if limited:
        errors.add(429)
    if needs_key(method, view):
        errors.update((401, 429))
        if secured:
            op["security"] = [{"bearer": []}]
    success = {"description": summary, "headers": {name: RESPONSE_HEADERS[name] for name in doc["headers"]}}
    if doc["returns"] is not None:
        schema = {"type": "array", "items": doc["returns"]} if doc["many"] else doc["returns"]
        success["content"] = {"application/json": {"schema": schema,
                                                   "example": examples.response(doc["returns"], doc["many"])}}
    if doc["media"] is not None:
        success["content"] = {doc["media"]: {"schema": {"type": "string"}}}
        success["headers"]["ETag"] = RESPONSE_HEADERS["ETag"]
        op["responses"]["304"] = {"description": "Not Modified: nothing changed since the ETag sent in If-None-Match."}
    op["responses"][str(doc["status"])] = success
    for code in sorted(errors):
        op["responses"][str(code)] = {"description": ERROR_MEANINGS[code], "content": {
            "application/problem+json": {"schema": "Problem", "example": examples.problems[code]}}}
    return op


DOCS = "dealership_docs"
docs_bp = Blueprint(DOCS, __name__)


def docs_url():
    """Where the interactive docs of the app handling this request are."""
    return f"{request.script_root}{current_app.extensions[DOCS]}/docs"


@docs_bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI document, made once a day per app (its examples are a week ahead of today)."""
    cache = current_app.extensions.setdefault("dealership_openapi", {})
    today = datetime.now(timezone.utc).date()
    if cache.get("day") != today:
        cache["document"], cache["day"] = to_json(openapi_document(current_app)), today
    return json_text(cache["document"])


def init_docs(app, prefix=""):
    """Mount {prefix}/openapi.json and the Swagger UI page at {prefix}/docs (its assets come
    from the flask-swagger-ui package, so the page works offline)."""
    app.extensions[DOCS] = prefix
    app.register_blueprint(docs_bp, url_prefix=prefix or None)
    app.register_blueprint(get_swaggerui_blueprint(f"{prefix}/docs", f"{prefix}/openapi.json", config={
        "app_name": "Dealership API", "tryItOutEnabled": True, "persistAuthorization": True,
        "layout": "BaseLayout"}))  # without the "Explore" bar, which invites loading another document
    app.add_url_rule(f"{prefix}/docs", endpoint="swagger_ui.show")  # /docs itself, not only /docs/


# ---------------------------------------------------------------------------------------------
# The planning board: the fleet against the days, as one HTML page made on the server
# ---------------------------------------------------------------------------------------------

BOARD = "dealership_board"
board_bp = Blueprint(BOARD, __name__)
board_bp.register_error_handler(HTTPException, http_error)
board_bp.register_error_handler(ValidationError, validation_error)
BOARD_DAYS = (7, 14, 28)
FIRST_BOARD_DAY, LAST_BOARD_DAY = date(1971, 1, 1), date(9998, 12, 1)


class Day(fields.String):
    """A calendar date written YYYY-MM-DD, from 1971 to 9998."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            day = date.fromisoformat(value) if re.fullmatch(r"\d{4}-\d\d-\d\d", value) else None
        except ValueError:
            day = None
        if day is None or not FIRST_BOARD_DAY <= day <= LAST_BOARD_DAY:
            raise ValidationError("Must be a date written YYYY-MM-DD (2035-06-04), from 1971 to 9998.")
        return day


class BoardQuery(Schema):
    start = Day(metadata=about("The first day shown; the Monday of this week when left out."))
    days = Count(load_default=14, validate=validate.OneOf(BOARD_DAYS), metadata=about("7, 14 or 28 days."))
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars."))


BOARD_QUERY = BoardQuery()


@board_bp.get("/board")
def board():
    """The fleet at a glance: one row per car, grouped by dealer, one column per day; bookings as bars
    placed by their times, maintenance windows hatched, the turnaround after each booking as a light
    tail, cars in maintenance status greyed. No customer's name or e-mail: the page needs no key."""
    service = store()
    service.sync()
    filters = query(BOARD_QUERY)
    today = datetime.now(service.zone).date()
    first = filters.get("start", today - timedelta(days=today.weekday()))
    days, dealer_id = filters["days"], filters.get("dealer_id")
    if dealer_id is not None:
        service.dealer(dealer_id)
    midnights = [datetime.combine(first + timedelta(days=n), dt_time(0), service.zone).astimezone(timezone.utc)
                 for n in range(days + 1)]
    period = Period(midnights[0], midnights[-1])
    columns = [{"label": (first + timedelta(days=n)).strftime("%a %d"), "today": first + timedelta(days=n) == today,
                "place": period.place(micros(midnights[n]), micros(midnights[n + 1]))} for n in range(days)]
    texts = current_app.extensions.setdefault(BOARD, {})
    if len(texts) > BOARD_TEXTS_KEPT:
        texts.clear()
    groups = []
    for dealer, cars in service.board_rows(period.begin, period.end, dealer_id):
        pad = dealer.turnaround_minutes * MINUTE
        rows = [{"car": car, "out": car.status != "available",
                 "bars": Markup("".join(bar_html(entry, period, pad, texts) for entry in entries))}
                for car, entries in cars]
        groups.append({"dealer": dealer, "rows": rows})
    link = functools.partial(url_for, f"{BOARD}.board", days=days)
    dealer_arg = {} if dealer_id is None else {"dealer_id": dealer_id}
    template = current_app.extensions.get(BOARD_TEMPLATE_KEY)
    if template is None:  # compiled once per app (render_template_string would compile it each time)
        template = current_app.extensions[BOARD_TEMPLATE_KEY] = current_app.jinja_env.from_string(BOARD_TEMPLATE)
    return render_template(
        template, groups=groups, columns=columns, days=days,
        period=f"{first:%a %d %b %Y} to {first + timedelta(days=days - 1):%a %d %b %Y}", zone=service.zone,
        previous=link(start=(first - timedelta(days=days)).isoformat(), **dealer_arg),
        next=link(start=(first + timedelta(days=days)).isoformat(), **dealer_arg),
        today=link(**dealer_arg), all_dealers=link(start=first.isoformat()),
        docs=docs_url() if DOCS in current_app.extensions else None,
        dealers=[(dealer, link(start=first.isoformat(), dealer_id=dealer.id)) for dealer in service.dealers.values()],
        dealer_id=dealer_id)


class Period:
    """The board's period, [begin, end) (aware), and where an instant (micros) falls in it, in percent."""

    def __init__(self, begin, end):
        self.begin, self.end = begin, end
        self.first, self.last = micros(begin), micros(end)
        self.scale = 100 / (self.last - self.first)

    def place(self, start, stop):
        """left and width, in percent of the period, of [start, stop) clipped to it."""
        left = (max(start, self.first) - self.first) * self.scale
        right = (min(stop, self.last) - self.first) * self.scale
        return f"{left:.4f}", f"{max(right - left, 0):.4f}"


BOARD_TEMPLATE_KEY = "dealership_board_template"
BOARD_TEXTS_KEPT = 200_000  # entries whose text the board keeps ready; beyond, it starts afresh


def bar_html(entry, period, pad, texts):
    """One entry of a schedule as the board draws it: a bar placed by its times, with its text (the
    part that does not depend on the period is made once per record and kept), cut at the edges of
    the period and marked as continuing; after a booking, its turnaround as a light tail."""
    key = (type(entry), entry.id)
    known = texts.get(key)
    if known is None or known[0] is not entry:  # records are immutable: a change is a new one
        known = texts[key] = (entry, *bar_text(entry), micros(entry.start_datetime), micros(entry.end_datetime))
    _, kind, attributes, label, start, end = known
    first, last, scale = period.first, period.last, period.scale
    cut_start, cut_end = start < first, end > last
    left = ((start if start > first else first) - first) * scale  # Period.place, inlined: it runs per bar
    width = ((end if end < last else last) - first) * scale - left
    html = (f'<div class="bar {kind}{" cut-start" if cut_start else ""}{" cut-end" if cut_end else ""}"{attributes}'
            f'{" data-continues-before" if cut_start else ""}{" data-continues-after" if cut_end else ""}'
            f' style="left:{left:.4f}%;width:{width:.4f}%">{"&#9664; " if cut_start else ""}{label}'
            f'{" &#9654;" if cut_end else ""}</div>')
    if kind == "booking" and pad and end < period.last:
        left, width = period.place(end, end + pad)
        html = f'<div class="tail" aria-hidden="true" style="left:{left}%;width:{width}%"></div>' + html
    return html


def bar_text(entry):
    """What the board says of an entry whatever the period: (kind, its attributes as HTML, its label)."""
    service = store()
    shown = f"{service.show(entry.start_datetime)[:16].replace('T', ' ')} to " \
            f"{service.show(entry.end_datetime)[:16].replace('T', ' ')}"
    if type(entry) is Booking:
        kind, label = "booking", str(entry.id)
        title = f"Booking {entry.id}: {shown}, {entry.total_cents / 100:.2f} {service.currency}"
    else:
        kind, label = "window", entry.note or "Maintenance"
        title = f"Maintenance window {entry.id}{': ' + entry.note if entry.note else ''}: {shown}"
    attributes = (f' data-{kind}-id="{entry.id}" data-start="{service.show(entry.start_datetime)}"'
                  f' data-end="{service.show(entry.end_datetime)}" title="{escape(title)}" aria-label="{escape(title)}"')
    return kind, attributes, escape(label)


BOARD_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fleet board: {{ period }}</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem; color: #1b1b1b; }
  nav a { margin-right: .8rem; }
  .board { margin-top: 1rem; min-width: 60rem; position: relative; }
  .grid { position: absolute; top: 0; bottom: 0; left: 17rem; right: 0; pointer-events: none; }
  .row { display: flex; border-bottom: 1px solid #ddd; min-height: 2rem; }
  .car { flex: 0 0 17rem; padding: .3rem .5rem; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
  .vin { color: #666; font-family: monospace; }
  .status { font-size: 85%; color: #666; }
  .lane { position: relative; flex: 1; }
  .day, .cell { position: absolute; top: 0; bottom: 0; border-left: 1px solid rgba(0, 0, 0, .08); box-sizing: border-box; }
  .cell.today { background: rgba(255, 196, 0, .15); }
  .head .day { padding: .3rem; font-weight: 600; white-space: nowrap; overflow: hidden; }
  .today { background: #fff6d5; }
  .bar { position: absolute; top: .3rem; bottom: .3rem; box-sizing: border-box; border-radius: 3px; padding: 0 .3rem;
         font-size: 12px; line-height: 1.4rem; overflow: hidden; white-space: nowrap; }
  .booking { background: #2f6fb2; color: #fff; }
  .window { background: repeating-linear-gradient(45deg, #c0392b 0 6px, #f3c6c0 6px 12px); color: #000; }
  .tail { position: absolute; top: .3rem; bottom: .3rem; background: #cfe0f3; }
  .cut-start { border-top-left-radius: 0; border-bottom-left-radius: 0; border-left: 3px dashed #000; }
  .cut-end { border-top-right-radius: 0; border-bottom-right-radius: 0; border-right: 3px dashed #000; }
  .out { background: #e4e4e4; color: #777; }
  h2 { font-size: 1rem; margin: 1rem 0 0; padding: .3rem .5rem; background: #f2f2f2; }
  @media print { nav { display: none; } body { margin: 0; } }
</style>
</head>
<body>
<h1>Fleet board</h1>
<p>{{ period }}, times in {{ zone }}. Bars are bookings (with their id), hatched bars maintenance
windows, light tails the dealer's turnaround; a dashed edge means it goes on past the period; grey
rows are cars in maintenance.</p>
<nav>
  <a href="{{ previous }}" rel="prev">&larr; Previous {{ days }} days</a>
  <a href="{{ today }}">Today</a>
  <a href="{{ next }}" rel="next">Next {{ days }} days &rarr;</a>
  | <a href="{{ all_dealers }}"{% if dealer_id is none %} aria-current="page"{% endif %}>All dealers</a>
  {% for dealer, href in dealers %}<a href="{{ href }}"{% if dealer.id == dealer_id %} aria-current="page"{% endif %}>{{ dealer.name }}</a>{% endfor %}
  {% if docs %}| <a href="{{ docs }}">API docs</a>{% endif %}
</nav>
<div class="board" role="table" aria-label="Cars against days">
  <div class="row head" role="row">
    <div class="car" role="columnheader">Car</div>
    <div class="lane">{% for day in columns %}<div class="day{% if day.today %} today{% endif %}" role="columnheader" style="left:{{ day.place[0] }}%;width:{{ day.place[1] }}%">{{ day.label }}</div>{% endfor %}</div>
  </div>
  {% for group in groups %}
  <h2 class="dealer" data-dealer-id="{{ group.dealer.id }}">{{ group.dealer.name }}{% if group.dealer.location %}, {{ group.dealer.location }}{% endif %}{% if group.dealer.turnaround_minutes %} ({{ group.dealer.turnaround_minutes }} minutes of turnaround){% endif %}</h2>
  {% for row in group.rows %}
  <div class="row{% if row.out %} out{% endif %}" role="row" data-car-id="{{ row.car.id }}">
    <div class="car" role="rowheader">{{ row.car.brand }} {{ row.car.model }} <span class="vin">&hellip;{{ row.car.vin[-6:] }}</span> <span class="status">{{ row.car.status }}</span></div>
    <div class="lane">
      {{- row.bars }}
    </div>
  </div>
  {% endfor %}
  {% endfor %}
  <div class="grid" aria-hidden="true">{% for day in columns %}<div class="cell{% if day.today %} today{% endif %}" style="left:{{ day.place[0] }}%;width:{{ day.place[1] }}%"></div>{% endfor %}</div>
</div>
</body>
</html>
"""


# ---------------------------------------------------------------------------------------------
# CLI commands, registered by init_app: serve (production) and backup
# ---------------------------------------------------------------------------------------------

SERVE_CONNECTIONS = 1000  # open connections waitress accepts: far above its threads, so idle ones lock nobody out
SERVE_IDLE_SECONDS = 30  # a connection that sends nothing for this long is closed; and the longest a stop waits


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="The address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="The port.")
@click.option("--workers", type=click.IntRange(1, 256), default=None,
              help="Server processes on the one port and database file. Default: the number of cores "
                   "(one with DEALERSHIP_DATABASE=:memory:, and on Windows).")
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 1000), help="Threads per process.")
@click.option("--socket-fd", type=int, hidden=True)  # a worker: serve the listening socket its supervisor opened
@with_appcontext
def serve_command(host, port, workers, threads, socket_fd):
    """Serve the app in production with waitress, in one process or several.

    No body larger than DEALERSHIP_MAX_CONTENT_LENGTH is read or spooled; many idle or slow
    connections do not lock other clients out; SIGTERM (or Ctrl+C) stops taking connections and
    finishes the requests in flight first. With several workers, this process opens the port and
    keeps one waitress process per worker serving it, each with its own store on the one database file.
    """
    app = current_app._get_current_object()
    if socket_fd is not None:
        return serve_worker(app, socket.socket(fileno=socket_fd), threads)
    memory = store().db.path == MEMORY
    if workers is not None and workers > 1 and memory:
        raise click.ClickException(
            f"--workers {workers} with DEALERSHIP_DATABASE=':memory:': each process would keep a store of its "
            "own, and clients would see different data. Set DEALERSHIP_DATABASE to a file, or use --workers 1.")
    if workers is not None and workers > 1 and os.name == "nt":
        raise click.ClickException("--workers above 1 needs a POSIX system (Linux, macOS): on Windows, use --workers 1.")
    if workers is None:
        workers = 1 if memory or os.name == "nt" else os.cpu_count() or 1
    listener = socket.create_server((host, port), backlog=2048)
    if workers == 1:
        return serve_worker(app, listener, threads)
    supervise(listener, workers, threads)


def serve_worker(app, listener, threads):
    """One waitress process on `listener` until SIGTERM or SIGINT, then the requests in flight finished."""
    import waitress
    from waitress.channel import HTTPChannel
    from waitress.wasyncore import dispatcher, loop

    logging.basicConfig()  # as waitress.serve() does: one handler, on the root logger
    logging.getLogger("waitress").setLevel(logging.INFO)  # "Serving on ..."
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = waitress.create_server(app, sockets=[listener], threads=threads, ident="dealership",
                                    max_request_body_size=app.config["DEALERSHIP_MAX_CONTENT_LENGTH"],
                                    connection_limit=SERVE_CONNECTIONS, channel_timeout=SERVE_IDLE_SECONDS)
    server.print_listen("Serving on http://{}:{}")
    stopping, parent = [], os.getppid()
    for sign in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sign, lambda *_: stopping.append(True))
    while not stopping:
        loop(timeout=1.0, map=server._map, use_poll=True, count=1)
        if os.getppid() != parent:  # its supervisor is gone (kill -9): go with it, as it would have
            os._exit(1)
    dispatcher.close(server)  # no new connection; the others finish what they were sent, then close
    deadline = time.monotonic() + SERVE_IDLE_SECONDS
    while time.monotonic() < deadline:
        busy = False
        for channel in list(server._map.values()):
            if isinstance(channel, HTTPChannel):
                if channel.requests or channel.request is not None or channel.total_outbufs_len:
                    busy = True
                else:
                    channel.will_close = True
        if not busy:
            break
        loop(timeout=0.05, map=server._map, use_poll=True, count=1)
    loop(timeout=0.05, map=server._map, use_poll=True, count=2)  # closes the channels just marked
    server.task_dispatcher.shutdown()
    log.info("stopped: requests in flight finished")


def supervise(listener, workers, threads):
    """Keep `workers` processes serving `listener` (each `flask ... serve` on the inherited socket),
    start a new one if one dies, and on SIGTERM or SIGINT pass the signal on and wait for them."""
    info = click.get_current_context().find_object(ScriptInfo)
    command = [sys.executable, "-m", "flask"] + (["--app", info.app_import_path] if info and info.app_import_path else []) + \
        ["serve", "--threads", str(threads), "--socket-fd", str(listener.fileno())]
    host, port = listener.getsockname()[:2]
    log.info("serving http://%s:%d with %d worker processes", host, port, workers)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    def start():
        return subprocess.Popen(command, pass_fds=[listener.fileno()])

    children = [start() for _ in range(workers)]
    while not stopping:
        time.sleep(0.2)
        for n, child in enumerate(children):
            if child.poll() is not None and not stopping:
                log.error("worker %d exited with %s; starting another", child.pid, child.returncode)
                children[n] = start()
    for child in children:
        child.send_signal(signal.SIGTERM)
    listener.close()  # the workers close theirs: then the port takes no new connection
    for child in children:
        try:
            child.wait(timeout=SERVE_IDLE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            child.kill()
    log.info("stopped: %d workers", workers)


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@with_appcontext
def backup_command(path):
    """Copy the service's database to PATH, consistently, while the service keeps running."""
    database = store().db
    if not database.shared:
        raise click.ClickException("DEALERSHIP_DATABASE is ':memory:': there is no file to back up.")
    try:
        counts = database.backup(path)
    except (sqlite3.Error, OSError) as error:
        raise click.ClickException(f"Could not back up {database.path} to {path}: {error}") from None
    click.echo(f"Backed up {database.path} to {path}: {plural(counts['dealers'], 'dealer')}, "
               f"{plural(counts['cars'], 'car')}, {plural(counts['bookings'], 'booking')}, "
               f"{plural(counts['maintenance_windows'], 'maintenance window')}.")


# ---------------------------------------------------------------------------------------------
# Wiring: init_app mounts the service on any Flask app; create_app builds the standalone one
# ---------------------------------------------------------------------------------------------


def init_app(app, url_prefix=API_PREFIX, docs_prefix=None, board_prefix=None):
    """Give `app` its own store on its database and mount the API at `url_prefix`.

    With `docs_prefix` ("" for the root), also mount {docs_prefix}/openapi.json and {docs_prefix}/docs;
    with `board_prefix` ("" for the root), the planning board at {board_prefix}/board.
    Settings are read from app.config (see SETTINGS); a bad one, or a database file that cannot be
    used, raises ConfigError. Registers the `backup` CLI command.
    """
    for name, (default, read) in SETTINGS.items():
        app.config[name] = read(name, app.config.get(name, default))
    zone = ZoneInfo(app.config["DEALERSHIP_TIMEZONE"])
    database = open_database(app)
    if app.config["DEALERSHIP_DEMO_DATA"]:
        load_demo_data(database, zone)
    service = Store(database, zone=zone, currency=app.config["DEALERSHIP_CURRENCY"])
    if not app.config["DEALERSHIP_API_KEY"]:
        log.warning("DEALERSHIP_API_KEY is not set: anyone who can reach the service can change its data.")
    app.extensions[EXTENSION] = service
    app.extensions[REFUSALS] = Refusals()
    init_limits(app)
    if app.url_map.converters.setdefault("digits", Digits) is not Digits:
        raise ConfigError("The app already has a URL converter named 'digits'; the service needs its own.")
    app.register_blueprint(bp, url_prefix=url_prefix)
    app.cli.add_command(backup_command)
    app.cli.add_command(serve_command)
    if docs_prefix is not None:
        init_docs(app, docs_prefix)
    if board_prefix is not None:
        app.register_blueprint(board_bp, url_prefix=board_prefix or None)
    return service


def init_limits(app):
    """The app's own Flask-Limiter (two apps share no counts): refused API keys are throttled per
    client address, and DEALERSHIP_RATE_LIMIT, when set, limits every request to the API. Only when
    there is something to limit: Flask-Limiter's checks cost some 0.06 ms on every request."""
    if not app.config["DEALERSHIP_API_KEY"] and not app.config["DEALERSHIP_RATE_LIMIT"]:
        return
    limiter = Limiter(get_remote_address, storage_uri=app.config["DEALERSHIP_RATELIMIT_STORAGE_URI"],
                      headers_enabled=True, swallow_errors=True)
    limiter.init_app(app)
    limiter.limit(app.config["DEALERSHIP_REFUSED_KEY_LIMIT"], deduct_when=lambda response: response.status_code == 401,
                  exempt_when=lambda: not key_required(), scope="refused API keys",
                  error_message="Too many refused API keys from this address: wait before trying again.")(bp)
    if app.config["DEALERSHIP_RATE_LIMIT"]:
        limiter.limit(app.config["DEALERSHIP_RATE_LIMIT"], scope="requests",
                      error_message="Too many requests from this address: wait before trying again.")(bp)


def open_database(app):
    """The Database that DEALERSHIP_DATABASE names: a path relative to the instance folder (made if
    missing), an absolute path, or ":memory:"."""
    path = app.config["DEALERSHIP_DATABASE"]
    if path != MEMORY:
        path = os.path.join(app.instance_path, path)  # an absolute path stays as it is
        folder = os.path.dirname(path)
        try:
            if os.path.commonpath([app.instance_path, path]) == app.instance_path:
                os.makedirs(folder, exist_ok=True)  # the instance folder is the service's to make
        except OSError as error:
            raise ConfigError(f"DEALERSHIP_DATABASE={path!r}: its folder cannot be made ({error}).") from None
        if not os.path.isdir(folder):
            raise ConfigError(f"DEALERSHIP_DATABASE={path!r}: the folder {folder!r} does not exist.")
    return Database(path, app.config["DEALERSHIP_SYNCHRONOUS"], app.config["DEALERSHIP_BUSY_TIMEOUT"])


def load_demo_data(database, zone):
    """Into a database without cars only: a second dealer (with an hour of turnaround), six cars (one
    in maintenance), three bookings and a maintenance window in the coming days. One transaction, so processes starting together load it once."""
    with database.write.transaction(write=True) as db:
        if not db.is_empty():
            return
        first = next(iter(db.rows("dealer")), None)
        main = first[0] if first else db.insert("dealer", SEED_DEALER)
        north = db.insert("dealer", {"name": "Oscar Mobility North", "location": "Hamburg, Germany",
                                     "turnaround_minutes": 60})
        # VINs unlike the README's and the docs' examples, which can then be tried on a demo too
        cars = [("Toyota", "Corolla", 2024, "White", 59.9, "JTDBR32E720654321", "available", main),
                ("Volkswagen", "Golf", 2023, "Grey", 64.5, "WVWZZZ1KZ6W612345", "available", main),
                ("BMW", "320i", 2022, "Black", 89.0, "WBA8E9C50GK123456", "maintenance", main),
                ("Mercedes-Benz", "C 200", 2024, "Silver", 95.0, "WDD2050421R123456", "available", north),
                ("Skoda", "Octavia", 2021, "Blue", 55.0, "TMBJJ7NE8L0123456", "available", north),
                ("Tesla", "Model 3", 2025, "Red", 110.0, "5YJ3E1EA7KF123456", "available", north)]
        car_ids = [db.insert("car", CAR_SCHEMA.load(dict(zip(CAR_FIELDS, values)))) for values in cars]
        today = datetime.now(zone).replace(hour=9, minute=0, second=0, microsecond=0)
        for car, days_ahead, length, who in [(0, 1, 2, "a"), (3, 2, 1, "b"), (1, 5, 3, "c")]:
            start = (today + timedelta(days=days_ahead)).astimezone(timezone.utc)
            end = start + timedelta(days=length)
            db.insert("booking", {"car_id": car_ids[car], "customer_name": f"Demo Customer {who.upper()}",
                                  "customer_email": f"demo-{who}@example.com", "start_datetime": start,
                                  "end_datetime": end, "total_cents": price_cents(cars[car][4], start, end)})
        service = (today + timedelta(days=3)).astimezone(timezone.utc)
        db.insert("window", {"car_id": car_ids[4], "start_datetime": service,
                             "end_datetime": service + timedelta(hours=4), "note": "Brake check"})
    log.info("%s: demo data loaded", database.path)


class OneLine(logging.StreamHandler):
    """Flask's own log line on stderr, but only while the root logger has no handler: a server or a
    host that sets up logging (waitress calls logging.basicConfig() once the app is made) gets each
    line once, through its own handler, instead of twice."""

    def emit(self, record):
        if logging.getLogger().handlers:
            return
        try:  # the stream is Flask's proxy for the request's wsgi.errors: looked up once, not per call
            stream = self.stream._get_current_object()
            stream.write(self.format(record) + self.terminator)
            stream.flush()
        except Exception:
            self.handleError(record)


class SecondFormatter(logging.Formatter):
    """A Formatter that writes the date and time to the second once a second, not once a line."""

    # (a whole second, that second as text): read and replaced whole, so that threads may share it
    second = (None, "")

    def formatTime(self, record, datefmt=None):
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        whole, second = int(record.created), self.second
        if second[0] != whole:
            second = self.second = (whole, time.strftime(self.default_time_format, self.converter(whole)))
        return self.default_msec_format % (second[1], record.msecs)


ONE_LINE = OneLine(flask.logging.wsgi_errors_stream)
ONE_LINE.setFormatter(SecondFormatter("[%(asctime)s] %(levelname)s in %(module)s: %(message)s"))  # Flask's format


def create_app(config=None):
    """A standalone app: the API under /api/v1, /openapi.json, /docs, /health, and JSON for every error.

    Settings come from the environment (DEALERSHIP_*), then from `config`, which wins.
    """
    app = Flask(__name__)
    app.logger.setLevel(logging.INFO)  # the "dealership" logger: one line per change
    if flask.logging.default_handler in app.logger.handlers:  # put there by Flask: see OneLine
        app.logger.removeHandler(flask.logging.default_handler)
        app.logger.addHandler(ONE_LINE)
    app.config.update({name: os.environ[name] for name in SETTINGS if name in os.environ})
    app.config.update(config or {})
    init_app(app, docs_prefix="", board_prefix="")
    proxies = app.config["DEALERSHIP_PROXIES"]
    if proxies:  # the client's address and scheme as the trusted proxies in front say
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    # Routing misses (404, 405) happen before a blueprint is chosen: they need app-level handlers.
    app.register_error_handler(HTTPException, http_error)

    @app.get("/")
    def home():
        """The front door of the standalone service: the interactive docs."""
        return redirect(docs_url())

    @app.get("/health")
    def health():
        """Liveness: the service answers, and so does its database (a trivial read)."""
        try:
            store().ping()
        except sqlite3.Error as error:
            response = problem(503, "Service Unavailable", f"The database does not answer: {error}.")
            response.headers["Retry-After"] = "5"
            return response
        return json_response({"status": "ok", "database": "ok"})

    return app
