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
change is written first to the database (DEALERSHIP_DATABASE): a SQLite file, which several
processes on one machine may share, or PostgreSQL, which processes on any number of machines may:
each catches up with the others' changes before it answers. Writes that arrive
together share one transaction and one sync to disk (group commit), each answered once it holds.

The sections, each using only what stands above it: constants and settings; records (immutable,
each versioned: its ETag; holds), domain errors and the pure domain rules; the fleet in memory (dicts, schedules, day coverage,
queries: no locks, no SQL); storage engines (SQLite, on a file or in memory, and PostgreSQL: all
the SQL); the write queue (group commit); the metrics; the Store, which holds the locks and ties
fleet, engine and queue together (and an Idempotency-Key's answer, kept in the write's own
transaction); schemas; HTTP helpers (request ids, the access log, metrics per request,
Idempotency-Key, ETag and If-Match) and the one error mapping; routes by resource (holds and the
change feed among them) and the calendar feeds; the OpenAPI
document and docs page; the planning board; logs (text or JSON); CLI commands and the server
adapter; wiring (init_app, create_app: /health, /health/ready, /metrics).
"""
import atexit
import bisect
import contextvars
import functools
import hashlib
import heapq
import hmac
import inspect
import json
import logging
import operator
import os
import queue
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from decimal import ROUND_HALF_UP, Decimal
from urllib.parse import quote as percent_encoded, unquote_to_bytes, urlencode, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import click
import email_validator
import icalendar
import limits
import prometheus_client
import prometheus_client.multiprocess
import psycopg
import pythonjsonlogger.json
from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Blueprint, Flask, Response, after_this_request, current_app, g, has_request_context, redirect, render_template, request, url_for
from flask.cli import ScriptInfo, with_appcontext
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_swagger_ui import get_swaggerui_blueprint
from markupsafe import Markup, escape
from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus
from psycopg_pool import ConnectionPool, PoolTimeout
from sortedcontainers import SortedList
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import (BadRequest, HTTPException, NotFound, RequestEntityTooLarge, Unauthorized,
                                 UnsupportedMediaType, default_exceptions)
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

API_PREFIX = "/api/v1"
API_VERSION = "1.0.0"
EXTENSION = "dealership"
REFUSED_KEYS = "dealership_refused_keys"
RENDERINGS = "dealership_renderings"
DOCS = "dealership_docs"  # the docs' blueprint, and where it is mounted
# What text may hold, spelled out as regex classes that mean the same to the service (Python) and to
# the ECMA regexes that clients of the OpenAPI document use (and simple enough for fuzzers to generate
# from). A lone surrogate is refused in code as well: it is not a character, and no JSON Schema
# pattern can name it the same way in both dialects.
CONTROLS = r"\u0000-\u001f\u007f-\u009f"  # Unicode category Cc: tab and newline included
SPACES = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # whitespace other than Cc: str.strip()'s
# Category Cf above U+FFFF (Unicode 15.1: tags, musical and shorthand format controls...). No escape
# names them the same in both dialects (Python's \U000E0001, ECMA's \u{E0001}) and fuzzers cannot
# generate from a class of them, so like a lone surrogate they are refused in code: a text made only
# of them and of spaces and other format characters is invisible.
ASTRAL_FORMATS = "".join(map(chr, [0x110BD, 0x110CD, *range(0x13430, 0x13440), *range(0x1BCA0, 0x1BCA4),
                                   *range(0x1D173, 0x1D17B), 0xE0001, *range(0xE0020, 0xE0080)]))
FORMATS = (r"\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u202a-\u202e"
           r"\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb")  # category Cf below U+FFFF: zero-width, bidi...
CHAR = rf"[^{CONTROLS}]"
VISIBLE = rf"[^{CONTROLS}{SPACES}{FORMATS}]"
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
INVISIBLE_ONLY = re.compile(f"[{SPACES}{FORMATS}{ASTRAL_FORMATS}]+")
# 17 characters, any case, surrounding spaces allowed; I, O and Q never occur in a VIN.
VIN_PATTERN = rf"^[{SPACES}]*[A-HJ-NPR-Za-hj-npr-z0-9]{{17}}[{SPACES}]*$"
FIRST_CAR_YEAR = 1886
MIN_DAILY_PRICE = 0.01  # a cent: 5e-324 is no price
MAX_DAILY_PRICE = 1_000_000
CAR_STATUSES = ("available", "maintenance")
MAX_PAGE = 1000
DEFAULT_PAGE = 100  # bookings (a store can hold millions) and slots (one per car) answered without a limit
MAX_ERRORS = 20  # offending fields listed in one 422
MAX_SHOWN_NAME = 100  # characters of a field or parameter name that a 422 repeats: a client's may be 200 KB
MAX_TURNAROUND = 1440  # minutes: a day
MAX_NAME = 200  # characters of a customer's name
MAX_EMAIL = 254  # characters of an e-mail address, once normalized
MAX_HOLD_MINUTES, DEFAULT_HOLD_MINUTES = 30, 10  # how long a hold keeps a car's period
CLOCK_TOLERANCE = timedelta(minutes=1)  # how far in the past a new booking may start
SEED_DEALER_ID = 1  # a new database has one dealer, this one
SEED_DEALER = {"name": "Oscar Mobility Main", "location": "Munich, Germany", "turnaround_minutes": 0}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_NAMED = 10  # bookings a refused maintenance window names
MAX_CHUNKS = 100_000  # parts of available-cars answers kept ready; beyond, they are made afresh
MAX_BATCH = 64  # writes in one transaction at most
WRITE_ATTEMPTS = 3  # runs of a transaction that the database broke off to keep writers apart
MAX_FEED_PERIOD = timedelta(days=400)  # the longest period a calendar feed covers: its default (395 days) fits
MAX_FEED_EVENTS = 5000  # bookings and windows in one feed: what it costs to make grows with them
# An ISO 8601 duration of days, hours and minutes: P3D, PT4H, P1DT12H, PT90M. (No lookahead, so that
# the OpenAPI document can state it and fuzzers generate from it.)
DURATION_PATTERN = r"^P(?:\d{1,5}D(?:T(?:\d{1,7}H(?:\d{1,9}M)?|\d{1,9}M))?|T(?:\d{1,7}H(?:\d{1,9}M)?|\d{1,9}M))$"
DURATION = re.compile(DURATION_PATTERN)
MIN_SLOT, MAX_SLOT = timedelta(minutes=15), timedelta(days=90)
LATEST_SLOT_END = datetime(9999, 1, 1, tzinfo=timezone.utc)  # far enough from the end of the calendar for any zone
log = logging.getLogger("dealership")


class ConfigError(click.ClickException, ValueError):
    """A setting, or a database file, that the service cannot start with.

    A ClickException, so that `flask run` (and any Flask command) prints its one line, not a traceback.
    """

    def show(self, file=None):
        """The one line through the log once the service's log line is set up (so that under serve a
        worker that cannot start says so with its time and process id), else as click shows it."""
        if logging.getLogger().handlers:
            log.error("%s", self.format_message())
        else:
            super().show(file)

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


def whole_number(minimum, maximum=None):
    def read(name, value):
        if isinstance(value, str) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
                maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value!r} must be a whole number of at least {minimum}"
                              f"{f' and at most {maximum:,}' if maximum is not None else ''}.")
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


def hours(name, value):
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not 0 < number <= 24 * 366:
        raise ConfigError(f"{name}={value!r} must be a number of hours above 0, at most a year (8784).")
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
    # a SQLite file in the instance folder, ":memory:" for none, or a PostgreSQL URL
    "DEALERSHIP_DATABASE": ("dealership.sqlite3", text_setting),
    "DEALERSHIP_SYNCHRONOUS": ("full", one_of("full", "normal")),
    "DEALERSHIP_BUSY_TIMEOUT": (5, seconds),
    "DEALERSHIP_POOL_SIZE": (8, whole_number(1)),  # PostgreSQL connections per process: serve's --threads
    "DEALERSHIP_ACCEPT_WAL_LOSS": (False, boolean),  # start on a damaged WAL, without what SQLite drops of it
    "DEALERSHIP_RATE_LIMIT": (None, optional(rate_limit)),  # such as "300/minute", per client address
    "DEALERSHIP_REFUSED_KEY_LIMIT": ("10/minute", rate_limit),  # refused API keys per client address, then 429
    "DEALERSHIP_RATELIMIT_STORAGE_URI": ("memory://", text_setting),  # Flask-Limiter's counts: shared, if need be
    "DEALERSHIP_PROXIES": (0, whole_number(0)),  # trusted proxies in front, whose X-Forwarded-For tells the client
    "DEALERSHIP_CURRENCY": ("EUR", currency_code),  # what prices are in: shown beside them, never converted
    "DEALERSHIP_LOG_FORMAT": ("text", one_of("text", "json")),  # json: one object per line, for log shippers
    "DEALERSHIP_ACCESS_LOG": (None, optional(boolean)),  # a line per request; not set: on under serve only
    "DEALERSHIP_METRICS": (True, boolean),  # off: requests are not counted, and /metrics is a 404
    "DEALERSHIP_METRICS_KEY": (None, optional(api_key)),  # if set, GET /metrics needs it as a Bearer token
    "DEALERSHIP_IDEMPOTENCY_HOURS": (24, hours),  # how long the answer to a request with an Idempotency-Key is kept
    "DEALERSHIP_HISTORY_DAYS": (365, whole_number(0, 36_525)),  # how long the change log (history, feed) is kept
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
    version: int = 1  # counts the record's changes, in the store of record: its ETag


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
    version: int = 1


@dataclass(frozen=True, slots=True)
class Booking:
    id: int
    car_id: int
    customer_name: str
    customer_email: str
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC
    total_cents: int  # the price, fixed when the booking is made or moved
    version: int = 1
    made_by: str = None  # the key that made it (see Access.who): a booking key sees only its own


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A period in which a car is in the workshop: it sits in the car's schedule beside its bookings."""
    id: int
    car_id: int
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC
    note: str
    version: int = 1


@dataclass(frozen=True, slots=True)
class Hold:
    """A car's period kept for a customer who is still checking out: in the car's schedule exactly as
    a booking is until `expires_at`, and from that instant as if it were not there. Confirmed, it
    becomes a booking of the same car and period."""
    id: int
    car_id: int
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC
    expires_at: datetime  # aware, UTC
    made_by: str = None  # the key that made it; the booking it is confirmed into keeps it


DEALER_FIELDS = ("name", "location", "turnaround_minutes", "version")
CAR_FIELDS = ("brand", "model", "year", "color", "daily_price", "vin", "status", "dealer_id", "version")
BOOKING_FIELDS = ("car_id", "customer_name", "customer_email", "start_datetime", "end_datetime", "total_cents",
                  "version", "made_by")
WINDOW_FIELDS = ("car_id", "start_datetime", "end_datetime", "note", "version")
HOLD_FIELDS = ("car_id", "start_datetime", "end_datetime", "expires_at", "made_by")


def changed(record, **changes):
    """`record` with `changes`, at its next version: every change of a versioned record goes through here."""
    return replace(record, **changes, version=record.version + 1)


# ---------------------------------------------------------------------------------------------
# Domain errors: what the rules refuse, in words a client can act on. The HTTP half maps each to
# its status (one place: see `problem_for`).
# ---------------------------------------------------------------------------------------------


class DomainError(Exception):
    """A refusal by the service's own rules; str() is the message for the client, `reason` the rule
    it broke as the refusals metric counts it (one of REFUSAL_REASONS; None: not a refusal)."""
    reason = None

    def __init__(self, message, reason=None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class NotFoundError(DomainError):
    """The record named does not exist (404)."""


class ForbiddenError(DomainError):
    """The API key sent may not do this (403): the message says which role or dealer it needs."""
    reason = "forbidden"


class ConflictError(DomainError):
    """The change clashes with what is stored (409)."""
    reason = "conflict"


class PreconditionFailed(DomainError):
    """The request's If-Match names another version of the record than the one stored (412)."""
    reason = "precondition_failed"


class GoneError(DomainError):
    """What the request names existed, and no longer counts: a hold that expired, a cursor of the
    change feed older than what it keeps (410)."""
    reason = "gone"


class InvalidError(DomainError):
    """A value breaks a rule that involves more than its field's own syntax (422 on `field`)."""
    reason = "invalid_input"

    def __init__(self, field, message, reason=None):
        super().__init__(message, reason)
        self.field = field


# What a refusal is counted as: the rule a request broke, or how it was turned away.
REFUSAL_REASONS = ("overlap", "held", "turnaround", "maintenance", "car_not_available", "in_the_past", "conflict",
                   "precondition_failed", "gone", "idempotency_key_reused", "invalid_input", "unauthorized",
                   "forbidden", "rate_limited")


# ---------------------------------------------------------------------------------------------
# Domain rules: pure functions over half-open periods [start, end)
# ---------------------------------------------------------------------------------------------


def overlaps(start_a, end_a, start_b, end_b):
    """True when [start_a, end_a) and [start_b, end_b) share at least one instant."""
    return start_a < end_b and start_b < end_a


EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)
MINUTE = 60_000_000  # micros
DAY = 24 * 60 * MINUTE
ID_SPAN = 1 << 63  # ids are below it (SQLite's integer keys are)


def micros(instant):
    """An aware instant as integer microseconds since 1970: exact, and the cheapest to compare."""
    return (instant - EPOCH) // MICROSECOND


def order_key(start, booking_id):
    """One integer that sorts bookings by start (micros), then id: the key of the fleet's index."""
    return start * ID_SPAN + booking_id


def format_instant(instant, zone):
    """An instant as RFC 3339 in `zone`: how every date-time is written out.

    Before standard time, a zone's offset may have seconds (Berlin's local mean time until 1893 is
    +00:53:28), which RFC 3339 cannot write: the instant is then written with the offset rounded to
    the minute, so that what is written still reads back as the same instant."""
    text = instant.astimezone(zone).isoformat()
    if text[-9] not in "+-":  # the usual ...HH:MM:SS+HH:MM, not an offset with seconds (+HH:MM:SS)
        return text
    minutes = round(instant.astimezone(zone).utcoffset() / timedelta(minutes=1))
    return instant.astimezone(timezone(timedelta(minutes=minutes))).isoformat()


def plural(n, noun):
    return f"{n} {noun}{'' if n == 1 else 's'}"


def check_period(start, end):
    """A period must end after it starts."""
    if start is not None and end is not None and end <= start:
        raise InvalidError("end_datetime", "Must be after start_datetime.")


def check_not_past(start, now, zone, what="booking"):
    """A booking (or window) may not start (or be moved to start) before now, give or take a minute
    for clocks that differ."""
    if start < now - CLOCK_TOLERANCE:
        raise InvalidError("start_datetime", f"Is in the past: a {what} can start from now on "
                                             f"({format_instant(now.replace(microsecond=0), zone)}).", "in_the_past")


def check_not_ended(booking, now, zone):
    """A booking that has ended is a record of what happened: it can no longer be changed (only one
    still to come or running can be moved, extended or given another car)."""
    if booking.end_datetime <= now:
        raise ConflictError(f"Booking {booking.id} ended at {format_instant(booking.end_datetime, zone)}: a booking "
                            "that has ended can no longer be changed.")


def free_gaps(entries, start, end, turnaround=timedelta(0)):
    """The gaps of [start, end) that no entry (sorted, non-overlapping), widened by `turnaround` on
    both sides, covers: where a booking could go."""
    gaps, cursor = [], start
    for entry in entries:
        if entry.start_datetime - turnaround > cursor:
            gaps.append((cursor, min(entry.start_datetime - turnaround, end)))
        cursor = max(cursor, entry.end_datetime + turnaround)
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


def parse_duration(text):
    """A timedelta from an ISO 8601 duration of days, hours and minutes, or None."""
    if not DURATION.fullmatch(text):
        return None
    units = {"D": "days", "H": "hours", "M": "minutes"}
    return timedelta(**{units[unit]: int(number) for number, unit in re.findall(r"(\d+)([DHM])", text)})


def describe(entry):
    """An entry of a schedule in words: 'booking 7', or 'maintenance window 2 (Brake check)'."""
    if type(entry) is Booking:
        return f"booking {entry.id}"
    if type(entry) is Hold:
        return f"hold {entry.id}"
    return f"maintenance window {entry.id}" + (f" ({entry.note})" if entry.note else "")


def clash(car, turnaround_minutes, start, end, other, zone):
    """Why [start, end) cannot go on `car` beside the entry `other` of its schedule (a ConflictError):
    an overlap with a booking, with maintenance, or too little turnaround."""
    name = describe(other)
    shown_start, shown_end = format_instant(other.start_datetime, zone), format_instant(other.end_datetime, zone)
    if overlaps(start, end, other.start_datetime, other.end_datetime):
        if type(other) is Booking:
            return ConflictError(f"Car {car.id} is already booked from {shown_start} to {shown_end} by {name}.",
                                 "overlap")
        if type(other) is Hold:
            return ConflictError(f"Car {car.id} is held from {shown_start} to {shown_end} by {name} until "
                                 f"{format_instant(other.expires_at, zone)}, for a customer who is booking it: "
                                 "try another period or car, or again once the hold has expired.", "held")
        return ConflictError(f"Car {car.id} is in maintenance from {shown_start} to {shown_end}: {name}.",
                             "maintenance")
    why = f"dealer {car.dealer_id} needs {plural(turnaround_minutes, 'minute')} of turnaround between two " \
          "entries of a car's schedule"
    turnaround = timedelta(minutes=turnaround_minutes)
    if other.end_datetime <= start:
        return ConflictError(f"Car {car.id} is not ready until {format_instant(other.end_datetime + turnaround, zone)}: "
                             f"{name} ends at {shown_end}, and {why}.", "turnaround")
    return ConflictError(f"Car {car.id} must be back by {format_instant(other.start_datetime - turnaround, zone)}, "
                         f"ready for {name} at {shown_start}: {why}.", "turnaround")


def bookings_in_the_way(car, turnaround_minutes, bookings, zone):
    """Why a maintenance window cannot go on `car`: the bookings it would hit, up to MAX_NAMED named."""
    shown = bookings[:MAX_NAMED]
    named = "; ".join(f"{entry.id} ({format_instant(entry.start_datetime, zone)} to "
                      f"{format_instant(entry.end_datetime, zone)})" for entry in shown)
    more = f", and {len(bookings) - len(shown)} more" if len(bookings) > len(shown) else ""
    return (f"The window would hit {plural(len(bookings), 'booking')} of car {car.id} (with dealer "
            f"{car.dealer_id}'s {plural(turnaround_minutes, 'minute')} of turnaround): {named}{more}. "
            "Move or cancel them first.")


# ---------------------------------------------------------------------------------------------
# Keys and roles: who may do what. A request's key is an Access; the routes name the roles they
# admit (api_doc), and check_access is the one place that says which records a role may act on.
# ---------------------------------------------------------------------------------------------

ROLES = ("admin", "staff", "booking")
ROLE_DUTIES = {"admin": "everything",
               "staff": "its dealer's cars, their maintenance windows, and the bookings and holds on them",
               "booking": "new bookings and holds on any car, then only the ones it made"}
KEY_BYTES = 32  # random bytes in a new key
KEY_USE_EVERY = timedelta(minutes=1)  # how often a key's "last used" is written, at most, per process
KEY_ID = re.compile(r"[1-9][0-9]{0,17}")  # a key's id as a key spells it: ASCII digits, no leading zero
KEYS_CHECK_EVERY = 1.0  # seconds: how often an open service looks whether a key has been made since


@dataclass(frozen=True)
class Access:
    """What the key of a request may do: `who` is the key's id (as text), "configuration" for
    DEALERSHIP_API_KEY or "open" when no key is needed; the history and a booking's maker say it."""
    who: str
    role: str
    dealer_id: int = None  # a staff key's dealer

    def __str__(self):
        if self.who in ("configuration", "open"):
            return "DEALERSHIP_API_KEY" if self.who == "configuration" else "an open service"
        return f"key {self.who} ({self.role}{f' of dealer {self.dealer_id}' if self.dealer_id else ''})"


OPEN = Access("open", "admin")
CONFIGURED = Access("configuration", "admin")
WRITER = contextvars.ContextVar("dealership_writer", default=None)  # (who, request id) of the write being made


def new_key():
    """A new key's secret: KEY_BYTES random bytes, URL-safe. The key a client sends is "<id>.<secret>"."""
    return secrets.token_urlsafe(KEY_BYTES)


def key_hash(secret):
    """What the store keeps of a key's secret: a fast hash is enough for a long random secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def no_booking(booking_id):
    """The 404 of a booking that is not there, or that the key may not see: the same words, so that
    another dealer's booking is not disclosed."""
    return NotFoundError(f"There is no booking with id {booking_id}.")


def check_access(access, record, fleet):
    """Raise unless `access` may act on `record`: a car (to change it, or to book or hold it), or a
    booking, hold or maintenance window (through its car). An admin key may do anything; a staff
    key acts on its dealer's cars and what is on them; a booking key books any car, and acts only on
    the bookings and holds it made. Another dealer's booking is a 404, anything else a 403."""
    if access.role == "admin":
        return
    car = record if isinstance(record, Car) else fleet.cars.get(record.car_id)
    if access.role == "staff":
        if car is not None and car.dealer_id == access.dealer_id:
            return
    elif isinstance(record, Car) or getattr(record, "made_by", None) == access.who:
        return
    if isinstance(record, Booking):
        raise no_booking(record.id)
    what = f"Car {record.id}" if isinstance(record, Car) else \
        f"{'Hold' if isinstance(record, Hold) else 'Maintenance window'} {record.id} on car {record.car_id}"
    if access.role == "staff":
        owner = f"dealer {car.dealer_id}'s" if car is not None else "not on a car of yours"
        raise ForbiddenError(f"{what} is {owner}: {access} may act only on dealer {access.dealer_id}'s cars. This "
                             f"needs an admin key{f' or a staff key of dealer {car.dealer_id}' if car else ''}.")
    raise ForbiddenError(f"{what} was made by another key: {access} may act only on what it made. This needs an "
                         "admin key, or a staff key of the car's dealer.")


def check_dealer(access, dealer_id):
    """Raise unless `access` may put a car at dealer `dealer_id`."""
    if access.role == "staff" and dealer_id != access.dealer_id:
        raise ForbiddenError(f"{access} may put cars only at dealer {access.dealer_id}, not at dealer {dealer_id}: "
                             f"this needs an admin key or a staff key of dealer {dealer_id}.")


# ---------------------------------------------------------------------------------------------
# The fleet in memory: every record in dicts, each car's schedule, the day coverage, and the
# queries over them. No locks and no SQL: the store holds its lock around every use.
# ---------------------------------------------------------------------------------------------


BITS = [tuple(n for n in range(8) if byte >> n & 1) for byte in range(256)]  # the set bits of each byte


class Schedule:
    """One car's schedule: its bookings and maintenance windows (entries) sorted by start, with their
    starts and ends as integers (micros) beside them.

    Entries never overlap, so sorted by start they are sorted by end too: an overlap check is one
    binary search over plain integers, with no key function and no record touched. A turnaround of
    `turnaround` micros is checked as an overlap with the period widened by it on both sides.
    """
    __slots__ = ("entries", "starts", "ends")

    def __init__(self, entries=()):
        """A schedule of `entries` (non-overlapping), sorted once."""
        self.entries = sorted(entries, key=operator.attrgetter("start_datetime"))
        self.starts = [micros(entry.start_datetime) for entry in self.entries]
        self.ends = [micros(entry.end_datetime) for entry in self.entries]

    def add(self, entry):
        start = micros(entry.start_datetime)
        i = bisect.bisect_left(self.starts, start)
        self.entries.insert(i, entry)
        self.starts.insert(i, start)
        self.ends.insert(i, micros(entry.end_datetime))

    def remove(self, entry):
        i = bisect.bisect_left(self.starts, micros(entry.start_datetime))
        del self.entries[i], self.starts[i], self.ends[i]

    def near(self, start, end, turnaround=0):
        """The entries that overlap [start - turnaround, end + turnaround) (micros), in time order."""
        return self.entries[bisect.bisect_right(self.ends, start - turnaround):
                            bisect.bisect_left(self.starts, end + turnaround)]

    def bookings(self):
        return [entry for entry in self.entries if type(entry) is Booking]

    def windows(self):
        return [entry for entry in self.entries if type(entry) is MaintenanceWindow]

    def holds(self):
        return [entry for entry in self.entries if type(entry) is Hold]


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


@dataclass(frozen=True, slots=True)
class Offerable:
    """The cars that can be offered, as masks over their positions in the coverage, made once after
    each change of a car or dealer (and whenever the coverage is made again); never changed after."""
    by_turnaround: dict  # turnaround (micros) -> the available cars whose dealer needs it
    by_dealer: dict  # dealer id -> its available cars
    cars: dict  # position -> every car (available or not)
    spans: dict  # position -> its schedule's (starts, ends): lists that change in place


class Fleet:
    """Every record, indexed for the queries the API answers. Lookups raise NotFoundError; the
    checks raise ConflictError; `put_*` and `drop_*` change the dicts (only after COMMIT)."""

    def __init__(self, zone, dealers=(), cars=(), bookings=(), windows=(), holds=()):
        self.zone = zone  # the dealership's: the times in messages are written in it
        self.dealers = {dealer.id: dealer for dealer in dealers}
        self.cars, self.car_by_vin, self.schedules = {}, {}, {}
        self.bookings, self.windows, self.by_email = {}, {}, {}
        # Every stored hold, and when each still in a schedule expires (a heap): at that instant it
        # leaves the schedule (see expire), and stays here until the database forgets it.
        self.holds, self.expiring, self.expired = {}, [], 0
        self.cars_version = 0  # counts changes of cars: what a rendering of the fleet is made from
        # Counts every change of any record, and names this fleet among all others (other processes,
        # other apps, a reload): together they tell whether a feed or the board could have changed.
        self.version, self.origin = 0, os.urandom(8).hex()
        self.coverage = self._offerable = None  # made when first asked for
        for car in cars:
            self.put_car(car)
        entries = {car_id: [] for car_id in self.cars}  # each car's schedule made in one go, sorted once
        for booking in bookings:
            self.bookings[booking.id] = booking
            entries[booking.car_id].append(booking)
            self.by_email.setdefault(booking.customer_email.casefold(), set()).add(booking.id)
        for window in windows:
            self.windows[window.id] = window
            entries[window.car_id].append(window)
        now = datetime.now(timezone.utc)
        for hold in holds:
            self.holds[hold.id] = hold
            if hold.expires_at > now:
                entries[hold.car_id].append(hold)
                heapq.heappush(self.expiring, (hold.expires_at, hold.id))
            else:
                self.expired += 1
        keys = []  # the index by start, from the starts the schedules have worked out already
        for car_id, found in entries.items():
            schedule = self.schedules[car_id] = Schedule(found)
            keys += [order_key(start, entry.id) for start, entry in zip(schedule.starts, schedule.entries)
                     if type(entry) is Booking]
        self.by_start = SortedList(keys)

    # -- lookups --------------------------------------------------------------------------------

    def dealer(self, dealer_id):
        try:
            return self.dealers[dealer_id]
        except KeyError:
            raise NotFoundError(f"There is no dealer with id {dealer_id}.") from None

    def car(self, car_id):
        try:
            return self.cars[car_id]
        except KeyError:
            raise NotFoundError(f"There is no car with id {car_id}.") from None

    def booking(self, booking_id):
        try:
            return self.bookings[booking_id]
        except KeyError:
            raise NotFoundError(f"There is no booking with id {booking_id}.") from None

    def window(self, car_id, window_id):
        window = self.windows.get(window_id)
        if window is None or window.car_id != car_id:
            self.car(car_id)
            raise NotFoundError(f"Car {car_id} has no maintenance window with id {window_id}.")
        return window

    def hold(self, hold_id, now):
        """A hold that has not expired: one that has is a 410 until the database forgets it."""
        hold = self.holds.get(hold_id)
        if hold is None:
            raise NotFoundError(f"There is no hold with id {hold_id}.")
        if hold.expires_at <= now:
            raise GoneError(f"Hold {hold_id} expired at {format_instant(hold.expires_at, self.zone)}: its period is "
                            "free again to anyone. Check that it is still free and book it, or place a new hold.")
        return hold

    def turnaround_micros(self, car):
        """The turnaround of a car's dealer: the least gap around each entry of its schedule."""
        return self.dealers[car.dealer_id].turnaround_minutes * MINUTE

    # -- the rules that need the stored records ---------------------------------------------------

    def check_vin_free(self, vin):
        if vin in self.car_by_vin:
            raise ConflictError(f"VIN {vin} is already used by car {self.car_by_vin[vin]}.")

    def check_dealer_removable(self, dealer_id):
        self.dealer(dealer_id)
        owned = sum(1 for car in self.cars.values() if car.dealer_id == dealer_id)
        if owned:
            raise ConflictError(f"Dealer {dealer_id} still has {plural(owned, 'car')}; move or delete them first.")

    def check_car_removable(self, car_id):
        self.car(car_id)
        booked = len(self.schedules[car_id].bookings())
        if booked:
            raise ConflictError(f"Car {car_id} has {plural(booked, 'booking')}; cancel them before deleting the car.")
        held = len(self.schedules[car_id].holds())
        if held:
            raise ConflictError(f"Car {car_id} has {plural(held, 'hold')} for customers who are booking it; delete "
                                "them, or wait until they expire (at most 30 minutes), before deleting the car.")

    def bookable_car(self, car_id, start, end, ignore=None):
        """The car, if [start, end) can be booked on it: it is available, and the period, widened by
        its dealer's turnaround, overlaps no other entry of its schedule."""
        car = self.car(car_id)
        if car.status != "available":
            raise ConflictError(f"Car {car.id} is in {car.status} and cannot be booked.", "car_not_available")
        for other in self.schedules[car.id].near(micros(start), micros(end), self.turnaround_micros(car)):
            if other is not ignore:
                raise clash(car, self.dealers[car.dealer_id].turnaround_minutes, start, end, other, self.zone)
        return car

    def check_window_fits(self, car_id, start, end):
        """A maintenance window may not overlap, nor come within the turnaround of, a booking or
        another window: the refusal names the bookings in the way."""
        car = self.car(car_id)
        turnaround = self.dealers[car.dealer_id].turnaround_minutes
        hits = self.schedules[car_id].near(micros(start), micros(end), turnaround * MINUTE)
        in_the_way = [entry for entry in hits if type(entry) is Booking]
        if in_the_way:
            raise ConflictError(bookings_in_the_way(car, turnaround, in_the_way, self.zone), "overlap")
        if hits:
            raise clash(car, turnaround, start, end, hits[0], self.zone)

    def refusal(self, car_id, start, end, now):
        """Why a booking of [start, end) on the car, made `now`, would be refused; None if it would not."""
        try:
            check_not_past(start, now, self.zone)
            self.bookable_car(car_id, start, end)
        except (InvalidError, ConflictError) as refused:
            return str(refused)
        return None

    # -- changes: made only after COMMIT ----------------------------------------------------------

    def put_dealer(self, dealer):
        self.version += 1
        self.dealers[dealer.id] = dealer
        self._offerable = None  # its turnaround may have changed

    def drop_dealer(self, dealer_id):
        self.version += 1
        del self.dealers[dealer_id]

    # A VIN maps to a car only while that car holds it: when a batch of changes swaps VINs between
    # cars, or gives a deleted car's VIN to a new one, a later step must not remove the new owner.

    def put_car(self, car):
        self.version += 1
        old = self.cars.get(car.id)
        if old is not None and self.car_by_vin.get(old.vin) == car.id:
            del self.car_by_vin[old.vin]
        self.car_by_vin[car.vin] = car.id
        self.cars[car.id] = car
        if car.id not in self.schedules:
            self.schedules[car.id] = Schedule()
        if self.coverage is not None and old is None and not self.coverage.add_car(car.id):
            self.coverage = None
        self._offerable = None
        self.cars_version += 1

    def drop_car(self, car_id):
        self.version += 1
        car = self.cars.pop(car_id)
        if self.car_by_vin.get(car.vin) == car_id:
            del self.car_by_vin[car.vin]
        for window in self.schedules.pop(car_id).windows():
            del self.windows[window.id]
        if self.coverage is not None:
            self.coverage.drop_car(car_id)
        self._offerable = None
        self.cars_version += 1

    def put_booking(self, booking):
        self.version += 1
        old = self.bookings.get(booking.id)
        if old is not None:
            self._unschedule_booking(old)
        self.bookings[booking.id] = booking
        self._schedule(booking)
        self.by_start.add(order_key(micros(booking.start_datetime), booking.id))
        self.by_email.setdefault(booking.customer_email.casefold(), set()).add(booking.id)

    def drop_booking(self, booking_id):
        self.version += 1
        self._unschedule_booking(self.bookings.pop(booking_id))

    def put_window(self, window):
        self.version += 1
        self.windows[window.id] = window
        self._schedule(window)

    def drop_window(self, window_id):
        self.version += 1
        self._unschedule(self.windows.pop(window_id))

    def put_hold(self, hold):
        """A hold in its car's schedule until it expires (one that already has is only kept, for its 410)."""
        self.version += 1
        self.holds[hold.id] = hold
        if hold.expires_at > datetime.now(timezone.utc):
            self._schedule(hold)
            heapq.heappush(self.expiring, (hold.expires_at, hold.id))
        else:
            self.expired += 1

    def drop_hold(self, hold_id):
        self.version += 1
        hold = self.holds.pop(hold_id)
        if self._scheduled(hold):
            self._unschedule(hold)
        else:
            self.expired -= 1

    def expire(self):
        """Take each hold that has expired by now out of its schedule: from that instant on, no check
        or query sees it. Called before every query and every write's checks; costs nothing while
        no hold is waiting to expire."""
        expiring = self.expiring
        if not expiring:
            return
        now = datetime.now(timezone.utc)
        while expiring and expiring[0][0] <= now:
            _, hold_id = heapq.heappop(expiring)
            hold = self.holds.get(hold_id)
            if hold is not None and self._scheduled(hold):
                self.version += 1
                self.expired += 1
                self._unschedule(hold)

    def stale_holds(self, before, most=100):
        """Up to `most` holds that expired before `before`, oldest first. Holds come in the order they
        were made, and none lasts more than MAX_HOLD_MINUTES, so the search stops at the first made
        later than that."""
        found, last = [], before + timedelta(minutes=MAX_HOLD_MINUTES)
        for hold in self.holds.values():
            if hold.expires_at >= last or len(found) == most:
                break
            if hold.expires_at < before:
                found.append(hold.id)
        return found

    def _scheduled(self, entry):
        """Whether `entry` itself is in its car's schedule."""
        schedule = self.schedules.get(entry.car_id)
        if schedule is None:
            return False
        i = bisect.bisect_left(schedule.starts, micros(entry.start_datetime))
        return i < len(schedule.entries) and schedule.entries[i] is entry

    def _clear_holds(self, entry):
        """Take out of the schedule any hold that `entry`, committed by another process, overlaps: that
        process saw it expired (its clock may be a little ahead of this one's)."""
        schedule = self.schedules[entry.car_id]
        for other in schedule.near(micros(entry.start_datetime), micros(entry.end_datetime)):
            if type(other) is Hold and other is not entry:
                self.expired += 1
                self._unschedule(other)

    def _schedule(self, entry):
        if self.expiring:  # some hold may still be in a schedule
            self._clear_holds(entry)
        self.schedules[entry.car_id].add(entry)
        if self.coverage is not None:
            self.coverage.add(entry.car_id, micros(entry.start_datetime), micros(entry.end_datetime))

    def _unschedule(self, entry):
        schedule = self.schedules[entry.car_id]
        schedule.remove(entry)
        if self.coverage is not None:
            self.coverage.remove(entry.car_id, micros(entry.start_datetime), micros(entry.end_datetime),
                                 schedule.starts, schedule.ends)

    def _unschedule_booking(self, booking):
        self._unschedule(booking)
        self.by_start.remove(order_key(micros(booking.start_datetime), booking.id))
        ids = self.by_email[booking.customer_email.casefold()]
        ids.discard(booking.id)
        if not ids:
            del self.by_email[booking.customer_email.casefold()]

    def apply(self, changed):
        """Bring each changed record ({kind: {id: record, or None when it is gone}}) to its stored
        state: dealers and cars first (a new booking may need them), bookings and windows out of
        their schedules before any goes back in (a move may swap two), and removed cars and dealers
        last (their bookings and cars went first)."""
        for dealer in changed.get("dealer", {}).values():
            if dealer is not None:
                self.put_dealer(dealer)
        for car in changed.get("car", {}).values():
            if car is not None:
                self.put_car(car)
        for booking_id in changed.get("booking", {}):
            if booking_id in self.bookings:
                self.drop_booking(booking_id)
        for window_id in changed.get("window", {}):
            if window_id in self.windows:
                self.drop_window(window_id)
        for hold_id in changed.get("hold", {}):
            if hold_id in self.holds:
                self.drop_hold(hold_id)
        for booking in changed.get("booking", {}).values():
            if booking is not None:
                self.put_booking(booking)
        for window in changed.get("window", {}).values():
            if window is not None:
                self.put_window(window)
        for hold in changed.get("hold", {}).values():
            if hold is not None:
                self.put_hold(hold)
        for car_id, car in changed.get("car", {}).items():
            if car is None and car_id in self.cars:
                self.drop_car(car_id)
        for dealer_id, dealer in changed.get("dealer", {}).items():
            if dealer is None and dealer_id in self.dealers:
                self.drop_dealer(dealer_id)

    # -- queries --------------------------------------------------------------------------------

    def offerable(self):
        """The Offerable masks, made again after each change of a car or dealer."""
        if self.coverage is None:
            self.coverage, self._offerable = Coverage(self.schedules), None
        if self._offerable is None:
            by_turnaround, by_dealer, cars, spans = {}, {}, {}, {}
            for car in self.cars.values():
                position, schedule = self.coverage.position[car.id], self.schedules[car.id]
                cars[position], spans[position] = car, (schedule.starts, schedule.ends)
                if car.status == "available":
                    turnaround, bit = self.turnaround_micros(car), 1 << position
                    by_turnaround[turnaround] = by_turnaround.get(turnaround, 0) | bit
                    by_dealer[car.dealer_id] = by_dealer.get(car.dealer_id, 0) | bit
            self._offerable = Offerable(by_turnaround, by_dealer, cars, spans)
        return self._offerable

    def free_cars(self, start, end, dealer_id=None):
        """The cars free for [start, end) (aware): available, and with no entry of their schedule,
        widened by their dealer's turnaround, overlapping it. A mask over their positions, and the
        Offerable it refers to."""
        start, end = micros(start), micros(end)
        offerable = self.offerable()
        coverage, free = self.coverage, 0
        for turnaround, candidates in offerable.by_turnaround.items():
            if dealer_id is not None:
                candidates &= offerable.by_dealer.get(dealer_id, 0)
            if not candidates:
                continue
            low, high = start - turnaround, end + turnaround
            split = coverage.split(low, high)
            if split is None:
                maybe = candidates
            else:
                free |= candidates & split[0]
                maybe = candidates & split[1]
            for position in coverage.positions(maybe) if maybe else ():
                starts, ends = offerable.spans[position]
                i = bisect.bisect_left(starts, high)
                if not (i and ends[i - 1] > low):
                    free |= 1 << position
        return free, offerable

    def cars_at(self, mask, offerable, stop=None):
        """The cars at the positions of `mask`, by id (the first `stop` of them, if given)."""
        return [offerable.cars[position] for position in self.coverage.positions(mask, stop)]

    def free_slots(self, length, after, before, offset, limit, dealer_id=None, brand=None, car_id=None):
        """For each car that can be offered and matches the filters, the earliest start (micros) of a
        period of `length` that starts at or after `after`, ends by `before` and can be booked, ordered
        by start, then car id: the page [offset, offset + limit) of them as (start, car), and how many
        there are in all. The day coverage tells at once which cars are free from `after` on; only
        the others are searched. Cars free at `after` come first, by id, as a mask: only when the
        page reaches past them are the later starts sorted."""
        length, after, before = length // MICROSECOND, micros(after), micros(before)
        if after > before - length:
            return [], 0
        offerable = self.offerable()
        wanted = self._slot_filter(offerable, dealer_id, brand, car_id)
        at_once, search = 0, {}
        for turnaround, candidates in offerable.by_turnaround.items():
            candidates &= wanted
            split = self.coverage.split(after - turnaround, after + length + turnaround) if candidates else None
            if split is not None:
                at_once |= candidates & split[0]
                candidates &= ~split[0]
            if candidates:
                search[turnaround] = candidates
        # When the cars surely free at `after` fill the page already, the others are only counted.
        counting = at_once.bit_count() >= offset + limit
        free_now, later, counted = self._later_starts(offerable, search, length, after, before, counting)
        at_once |= sum(1 << position for position in free_now)
        first = at_once.bit_count()
        page = [(after, offerable.cars[position]) for position in
                self.coverage.positions(at_once, offset + limit)[offset:offset + limit]]
        if offset + limit > first and later:
            later.sort()
            page += [(start, offerable.cars[position]) for start, position in
                     later[max(0, offset - first):offset + limit - first]]
        return page, first + len(later) + counted

    @staticmethod
    def _slot_filter(offerable, dealer_id, brand, car_id):
        """The positions a slot search may offer, as a mask (-1: every position)."""
        wanted = -1
        if dealer_id is not None:
            wanted = offerable.by_dealer.get(dealer_id, 0)
        if car_id is not None or brand:
            brand = brand.strip().casefold() if brand else None
            wanted &= sum(1 << position for position, car in offerable.cars.items()
                          if (car_id is None or car.id == car_id) and (brand is None or car.brand.casefold() == brand))
        return wanted

    def _later_starts(self, offerable, search, length, after, before, counting):
        """For the cars of `search` ({turnaround: mask}): those free at `after` after all, the others'
        earliest starts as (start, position) (or, when `counting`, only how many there are)."""
        latest = before - length  # the latest start that still ends by `before`
        bisect_right = bisect.bisect_right
        free_now, later, counted = [], [], 0
        for turnaround, candidates in search.items():
            low, reach = after - turnaround, length + turnaround
            free_until = after + reach  # an entry starting from here leaves `after` free
            for position in self.coverage.positions(candidates):
                # The earliest start at or after `after` free of every entry widened by the turnaround:
                # entries before i are done, turnaround included, by `after`; each one after that
                # which reaches into [start, start + length) pushes the start to its end plus the
                # turnaround (ends only grow), until the period fits or no longer ends by `before`.
                starts, ends = offerable.spans[position]
                i = bisect_right(ends, low)
                try:
                    if starts[i] >= free_until:
                        free_now.append(position)
                        continue
                    start = ends[i] + turnaround
                    while starts[i + 1] < start + reach and start <= latest:
                        i += 1
                        start = ends[i] + turnaround
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
        return free_now, later, counted

    def car_windows(self, car_id):
        """A car's maintenance windows, in time order."""
        self.car(car_id)
        return self.schedules[car_id].windows()

    def calendar(self, car_id, start, end, now):
        """One car, its entries that overlap [start, end), the gaps in it where a booking could go
        (none for a car in maintenance), and why the whole period cannot be booked now (or None)."""
        car = self.car(car_id)
        turnaround = self.turnaround_micros(car)
        schedule = self.schedules[car_id]
        near = schedule.near(micros(start), micros(end), turnaround)
        entries = schedule.near(micros(start), micros(end))
        free = free_gaps(near, start, end, timedelta(microseconds=turnaround)) if car.status == "available" else []
        return car, entries, free, self.refusal(car_id, start, end, now)

    def entries(self, start, end, car_id=None, dealer_id=None):
        """(car, entry) for each booking and window that overlaps [start, end), car by car (one car, or
        one dealer's) in time order: one binary search per car, plus the entries found."""
        start, end = micros(start), micros(end)
        cars = [self.car(car_id)] if car_id is not None else \
            [car for car in self.cars.values() if dealer_id is None or car.dealer_id == dealer_id]
        return [(car, entry) for car in cars for entry in self.schedules[car.id].near(start, end)]

    def board_rows(self, start, end, dealer_id=None):
        """For the board: each dealer (or one) with its cars by id, each with its entries that overlap
        [start, end); one binary search per car, plus the entries shown."""
        start, end = micros(start), micros(end)
        rows = {dealer.id: (dealer, []) for dealer in self.dealers.values()
                if dealer_id is None or dealer.id == dealer_id}
        for car in self.cars.values():
            if car.dealer_id in rows:
                rows[car.dealer_id][1].append((car, self.schedules[car.id].near(start, end)))
        return list(rows.values())

    def find_bookings(self, offset, limit, car_id=None, start=None, end=None, email=None, access=None):
        """One page of the bookings that `access` may see (None: all), ordered by start then id, and
        how many there are in all: overlapping [start, end) when both are given, starting at or after
        `start` or ending at or before `end` when only one is. Unfiltered or from a start, the page is
        read off the index (about the page's own cost); a filter by car, customer or end, or a staff
        key's dealer, reads only its candidates."""
        scoped = access is not None and access.role != "admin"
        if car_id is None and email is None and end is None and not scoped:
            first = 0 if start is None else self.by_start.bisect_left(order_key(micros(start), 0))
            keys = self.by_start[first + offset:first + offset + limit]
            return [self.bookings[key % ID_SPAN] for key in keys], len(self.by_start) - first
        if car_id is not None:
            found = self.schedules[car_id].bookings() if car_id in self.schedules else []
        elif email is not None:
            found = sorted((self.bookings[i] for i in self.by_email.get(email.casefold(), ())),
                           key=lambda b: (b.start_datetime, b.id))
        elif access is not None and access.role == "staff":
            found = sorted((b for car in self.cars.values() if car.dealer_id == access.dealer_id
                            for b in self.schedules[car.id].bookings()), key=lambda b: (b.start_datetime, b.id))
        else:  # only those that start before `end` can end by it
            before = None if end is None else self.by_start.bisect_left(order_key(micros(end), 0))
            found = [self.bookings[key % ID_SPAN] for key in self.by_start[:before]]
        if start is not None and end is not None:
            found = [b for b in found if overlaps(b.start_datetime, b.end_datetime, start, end)]
        elif start is not None:
            found = [b for b in found if b.start_datetime >= start]
        elif end is not None:
            found = [b for b in found if b.end_datetime <= end]
        if email is not None:
            email = email.casefold()
            found = [b for b in found if b.customer_email.casefold() == email]
        if scoped:
            found = [b for b in found if self.may_see(access, b)]
        return found[offset:offset + limit], len(found)

    def may_see(self, access, record):
        """Whether `access` may see `record` (see check_access)."""
        try:
            check_access(access, record, self)
        except DomainError:
            return False
        return True


# ---------------------------------------------------------------------------------------------
# Storage engines: the store of record under the fleet. An engine keeps every record and a change
# log, and is all the store needs of a database:
#   engine.name, engine.shared    what messages call it; whether other processes may write to it too
#   engine.identity               what names the database in every process (None: the fleet names its data)
#   engine.Error                  what its driver raises; engine.client_error(error) turns it into a
#                                 ConflictError or a StorageUnavailable (503) for the client, and
#                                 engine.retryable(error) says whether the transaction may run again
#   engine.writer(), .reader()    context managers lending a connection: for one batch of writes, and
#                                 for catching up (engine.Error if none can be had)
#   engine.combine(a, b)          the change log's position of a fleet with what both positions hold
#   engine.ping(), .backup(path)  a trivial read (and a dict of the engine's state); a consistent copy
#   engine.close()
# and of a connection: transaction(write), savepoint(), lock(rows), insert/update/delete(kind,
# ...) (counted in `written`), records(kind, ids), load() (every record and the log's position),
# news(position) (has anyone committed what the fleet at `position` lacks? cheap),
# changes_since(position) ({kind: {id: record or None}} and the new position, or None once the
# log no longer reaches back that far), after_writes(position) (the position with this
# transaction's writes), prune_change_log(), id_counters() and set_id_counters(). Positions are
# the engine's own: the store only keeps and combines them. SQLite (a file, or memory) and
# PostgreSQL are the engines; the SQL of each lives in its own classes and nowhere else. A write
# transaction fails (engine.Error, nothing kept) once what it writes to is no longer the database
# the service loaded (a SQLite file deleted or replaced, say).
# ---------------------------------------------------------------------------------------------

MEMORY = ":memory:"
APPLICATION_ID = 0x4445_4C52  # "DELR", written in the file's header: this is a dealership database
# The change log keeps every change of the last DEALERSHIP_HISTORY_DAYS (the history and the feed
# read it), and at least this many; a process further behind than it reaches loads everything again.
CHANGE_LOG_KEEP = 10_000
CHANGE_LOG_PRUNE_EVERY = 500  # changes between two prunings
# kind -> its table and its columns besides id
TABLES = {"dealer": ("dealers", DEALER_FIELDS),
          "car": ("cars", CAR_FIELDS),
          "booking": ("bookings", BOOKING_FIELDS),
          "window": ("maintenance_windows", WINDOW_FIELDS),
          "hold": ("holds", HOLD_FIELDS)}
FEED_ACTIONS = {"INSERT": "created", "UPDATE": "changed", "DELETE": "deleted"}  # what the change feed calls each


class StorageUnavailable(Exception):
    """The database refused a write, or cannot be read (503): nothing was changed."""

    def __init__(self, detail, retry_after):
        super().__init__(detail)
        self.retry_after = retry_after


class FileNotAtPath(sqlite3.OperationalError):
    """The file at the database's path is no longer the one the engine opened: deleted, moved or
    replaced. A driver error, so that every path that handles one (a write's 503, /health, catching
    up) handles this one too."""

    def __init__(self, path):
        super().__init__(f"the file {path!r} is no longer the one the service opened (it was deleted, moved "
                         "or replaced): put that file back at its path, or restart the service on the intended file")


def file_uri(path, mode):
    """`path` as a SQLite URI that opens it in `mode`: "rw" never creates the file, "rwc" may."""
    path = os.path.abspath(path).replace(os.sep, "/")
    if not path.startswith("/"):  # a Windows drive: file:///C:/...
        path = "/" + path
    for char in "%?#":  # "%" first: the others are escaped with it
        path = path.replace(char, f"%{ord(char):02x}")
    return f"file://{path}?mode={mode}"


def change_log_triggers(*kinds):
    """The triggers that write one row of the change log per changed record, in the transaction of
    the change itself, whoever makes it."""
    return "".join(f"""
    CREATE TRIGGER {TABLES[kind][0]}_{event.lower()} AFTER {event} ON {TABLES[kind][0]}
    BEGIN INSERT INTO changes (kind, id) VALUES ('{kind}', {row}.id); END;"""
                   for kind in kinds for event, row in [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")])


def feed_triggers(*kinds):
    """The triggers that write one row of the change log per changed record, in the transaction of
    the change itself, whoever makes it: what changed, how (FEED_ACTIONS), when, and the record as
    it then stood (JSON; null once deleted), for the change feed."""
    def record(kind, row):
        columns = ("id",) + TABLES[kind][1]
        return "json_object(" + ", ".join(f"'{name}', {row}.{name}" for name in columns) + ")"
    return "".join(f"""
    CREATE TRIGGER {TABLES[kind][0]}_{event.lower()} AFTER {event} ON {TABLES[kind][0]}
    BEGIN INSERT INTO changes (kind, id, action, at, record) VALUES ('{kind}', {row}.id, '{FEED_ACTIONS[event]}',
        strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), {'NULL' if event == 'DELETE' else record(kind, row)}); END;"""
                   for kind in kinds for event, row in [("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD")])


def fill_feed_log(conn):
    """Schema 3: each change logged before the feed, as its record stands now (deleted if it is gone),
    with the columns its table had then."""
    for kind, (table, _) in TABLES.items():
        values = ", ".join(f"'{name}', r.{name}" for _, name, *_ in conn.execute(f"PRAGMA table_info({table})"))
        conn.execute(f"UPDATE changes SET record = (SELECT json_object({values}) FROM {table} r WHERE r.id = changes.id) "
                     "WHERE kind = ?", (kind,))
    conn.execute("UPDATE changes SET action = CASE WHEN record IS NULL THEN 'deleted' ELSE 'changed' END, "
                 "at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')")


RECORD_TYPES = {"dealer": Dealer, "car": Car, "booking": Booking, "window": MaintenanceWindow, "hold": Hold}


def record_from_json(kind, data):
    """A record from its row as JSON (PostgreSQL's to_jsonb(), SQLite's json_object())."""
    fields = {name: data.get(name) for name in TABLES[kind][1]}  # made_by: not in changes logged before it
    for name in ("start_datetime", "end_datetime", "expires_at"):
        if name in fields:
            fields[name] = datetime.fromisoformat(fields[name])
    return RECORD_TYPES[kind](id=data["id"], **fields)


KEY_COLUMNS = ("id", "role", "dealer_id", "note", "secret_hash", "created_at", "last_used_at", "revoked_at")


def instant_or_none(value):
    """An instant as a driver gives it back (PostgreSQL: a datetime; SQLite: ISO 8601 text), or None."""
    return value if value is None or isinstance(value, datetime) else datetime.fromisoformat(value)


def to_column(value):
    """A value as the database keeps it: instants in UTC, as fixed-width ISO 8601 text."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return value


def booking_from_row(row):
    booking_id, car_id, name, email, start, end, cents, version, made_by = row
    return Booking(booking_id, car_id, name, email, datetime.fromisoformat(start), datetime.fromisoformat(end), cents,
                   version, made_by)


def window_from_row(row):
    window_id, car_id, start, end, note, version = row
    return MaintenanceWindow(window_id, car_id, datetime.fromisoformat(start), datetime.fromisoformat(end), note,
                             version)


def hold_from_row(row):
    hold_id, car_id, start, end, expires, made_by = row
    return Hold(hold_id, car_id, *map(datetime.fromisoformat, (start, end, expires)), made_by)


RECORD_FROM_ROW = {"dealer": lambda row: Dealer(*row), "car": lambda row: Car(*row),
                   "booking": booking_from_row, "window": window_from_row, "hold": hold_from_row}


def price_old_bookings(conn):
    """Schema 2: each booking made before prices, priced at its car's daily price of today."""
    prices = dict(conn.execute("SELECT id, daily_price FROM cars"))
    for booking_id, car_id, start, end in list(conn.execute(
            "SELECT id, car_id, start_datetime, end_datetime FROM bookings")):
        cents = price_cents(prices[car_id], datetime.fromisoformat(start), datetime.fromisoformat(end))
        conn.execute("UPDATE bookings SET total_cents = ? WHERE id = ?", (cents, booking_id))


@dataclass(frozen=True)
class SchemaStep:
    """One step of the schema, from the version before it to its own: its SQL, then what fills the new
    columns from the data already there (a function of the connection), in the same transaction."""
    sql: str
    fill: object = None


# PRAGMA user_version is the number of steps taken; a new file takes them all. AUTOINCREMENT: ids
# are never reused, even after a delete.
SCHEMA_STEPS = [
    SchemaStep("""
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
    """ + change_log_triggers("dealer", "car", "booking")),
    # Maintenance windows, dealers' turnaround, and the price of each booking (whole cents, fixed when
    # it is made or moved: bookings made before this version are priced at their car's price of today).
    SchemaStep("""
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
    """ + change_log_triggers("window"), fill=price_old_bookings),
    # Versions (ETags), holds, the change feed (what, how, when and the record, per change) and the
    # answers kept for Idempotency-Key.
    SchemaStep("""
    ALTER TABLE dealers ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE cars ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE bookings ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE maintenance_windows ADD COLUMN version INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE holds (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        car_id INTEGER NOT NULL REFERENCES cars (id),
        start_datetime TEXT NOT NULL,
        end_datetime TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        CHECK (end_datetime > start_datetime)
    );
    ALTER TABLE changes ADD COLUMN action TEXT NOT NULL DEFAULT 'changed';
    ALTER TABLE changes ADD COLUMN at TEXT;
    ALTER TABLE changes ADD COLUMN record TEXT;
    """ + "".join(f"DROP TRIGGER {table}_{event};" for table, _ in list(TABLES.values())[:4]
                  for event in ("insert", "update", "delete")) + feed_triggers(*TABLES) + """
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        fingerprint TEXT NOT NULL,
        status INTEGER NOT NULL,
        headers TEXT NOT NULL,
        body BLOB NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
    """, fill=fill_feed_log),
    # Keys per role (only a hash of each secret), the key that made each booking and hold, and the
    # history: which key made each change, in which request. (The booking and hold triggers of
    # schema 3 are made again with made_by; a new file's were made with it already.)
    SchemaStep("""
    ALTER TABLE bookings ADD COLUMN made_by TEXT;
    ALTER TABLE holds ADD COLUMN made_by TEXT;
    ALTER TABLE changes ADD COLUMN who TEXT;
    ALTER TABLE changes ADD COLUMN request_id TEXT;
    CREATE INDEX changes_by_record ON changes (kind, id);
    """ + "".join(f"DROP TRIGGER {TABLES[kind][0]}_{event};" for kind in ("booking", "hold")
                  for event in ("insert", "update", "delete")) + feed_triggers("booking", "hold") + """
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        role TEXT NOT NULL CHECK (role IN ('admin', 'staff', 'booking')),
        dealer_id INTEGER,
        note TEXT NOT NULL DEFAULT '',
        secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT,
        revoked_at TEXT,
        CHECK ((role = 'staff') = (dealer_id IS NOT NULL))
    );
    """),
]
SCHEMA_VERSION = len(SCHEMA_STEPS)


class StaleRecord(Exception):
    """A record to change or delete was no longer there: another process changed it after this
    one caught up. The transaction runs again, caught up."""

    @staticmethod
    def conflict():
        """What the client is told if it happens every time the write runs."""
        return ConflictError("Another process changed this record at the same moment, each time this write ran; "
                             "nothing was changed: try again.")


class RecordRows:
    """A record is one row of its kind's table (TABLES), written and read by the same statements on
    every engine; a connection class says what differs: its driver's placeholder (PARAM), what it
    stores for a value (column), the record a row is (record), how it learns a new row's id
    (_insert) and reads rows by ids (_rows). Each record written is one entry in the change log
    (the tables' triggers write it), counted in `written`."""

    def insert(self, kind, fields, record_id=None):
        """Insert a record; the database assigns the id, unless it is given."""
        table, columns = TABLES[kind]
        # a new record is at its first version (a copied one at its own), and made by no key unless one is named
        fields = {name: value for name, value in (("version", 1), ("made_by", None)) if name in columns} | fields
        if record_id is not None:
            fields, columns = fields | {"id": record_id}, ("id",) + columns
        self.written += 1
        places = ", ".join([self.PARAM] * len(columns))
        return self._insert(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({places})",
                            [self.column(fields[name]) for name in columns])

    def update(self, kind, record_id, fields):
        table, columns = TABLES[kind]
        self.written += 1
        self._one(self.conn.execute(f"UPDATE {table} SET {', '.join(f'{name} = {self.PARAM}' for name in columns)} "
                                    f"WHERE id = {self.PARAM}",
                                    [self.column(fields[name]) for name in columns] + [record_id]))

    def delete(self, kind, record_id):
        self.written += 1
        self._one(self.conn.execute(f"DELETE FROM {TABLES[kind][0]} WHERE id = {self.PARAM}", (record_id,)))

    @staticmethod
    def _one(cursor):
        if cursor.rowcount != 1:
            raise StaleRecord(f"the record to change matched {cursor.rowcount} rows, not 1")

    def records(self, kind, ids=None):
        """Every record of a kind by id or, given ids, a dict of id -> record in id order, None for a
        record that is gone."""
        table, columns = TABLES[kind]
        select = f"SELECT id, {', '.join(columns)} FROM {table}"
        if ids is None:
            return [self.record(kind, row) for row in self.conn.execute(select + " ORDER BY id")]
        found = dict.fromkeys(ids)
        for row in self._rows(select, ids):
            found[row[0]] = self.record(kind, row)
        return found

    def load(self):
        """Every record, as Fleet takes them ({"dealers": [...], ...}), and the change log's position,
        read in one snapshot."""
        with self.transaction(write=False):
            position = self.position()
            records = {"dealers": self.records("dealer"), "cars": self.records("car"),
                       "bookings": self.records("booking"), "windows": self.records("window"),
                       "holds": self.records("hold")}
        return records, position

    # -- the answers kept for Idempotency-Key: a table beside the records, in no change log --------

    def kept_answer(self, key):
        """What was answered to the first request with `key`: (fingerprint, status, headers as JSON
        text, body, when), or None."""
        row = self.conn.execute("SELECT fingerprint, status, headers, body, created_at FROM idempotency_keys "
                                f"WHERE key = {self.PARAM}", (key,)).fetchone()
        if row is None:
            return None
        made = row[4] if isinstance(row[4], datetime) else datetime.fromisoformat(row[4])
        return row[0], row[1], row[2], bytes(row[3]), made

    def keep_answer(self, key, fingerprint, status, headers, body, now):
        """Keep an answer with its key (replacing one kept for the key too long ago)."""
        self.conn.execute(
            "INSERT INTO idempotency_keys (key, fingerprint, status, headers, body, created_at) "
            f"VALUES ({', '.join([self.PARAM] * 6)}) ON CONFLICT (key) DO UPDATE SET fingerprint = "
            "excluded.fingerprint, status = excluded.status, headers = excluded.headers, body = excluded.body, "
            "created_at = excluded.created_at", (key, fingerprint, status, headers, body, self.column(now)))

    def forget_answers(self, before):
        """Forget the answers kept since before `before`."""
        self.conn.execute(f"DELETE FROM idempotency_keys WHERE created_at < {self.PARAM}", (self.column(before),))

    # -- API keys: a table beside the records, in no change log; a key's secret is never stored ----

    def add_key(self, role, dealer_id, note, secret_hash, now):
        """A new key's id."""
        return self._insert("INSERT INTO api_keys (role, dealer_id, note, secret_hash, created_at) "
                            f"VALUES ({', '.join([self.PARAM] * 5)})",
                            (role, dealer_id, note, secret_hash, self.column(now)))

    def api_keys(self):
        """Every key, oldest first: (id, role, dealer id, note, created, last used, revoked)."""
        return [row[:4] + tuple(map(instant_or_none, row[4:])) for row in self.conn.execute(
            "SELECT id, role, dealer_id, note, created_at, last_used_at, revoked_at FROM api_keys ORDER BY id")]

    def api_key(self, key_id):
        """(role, dealer id, hash of the secret, whether it was revoked) of a key, or None."""
        return self.conn.execute(f"SELECT role, dealer_id, secret_hash, revoked_at IS NOT NULL FROM api_keys "
                                 f"WHERE id = {self.PARAM}", (key_id,)).fetchone()

    def keys_made(self):
        """Whether any key was ever made (a revoked one included)."""
        return bool(self.conn.execute("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0])

    def revoke_key(self, key_id, now):
        """Revoke a key; False if there is no such key, or it was revoked already."""
        return self.conn.execute(f"UPDATE api_keys SET revoked_at = {self.PARAM} WHERE id = {self.PARAM} "
                                 "AND revoked_at IS NULL", (self.column(now), key_id)).rowcount == 1

    def key_rows(self):
        """Every key as stored (KEY_COLUMNS), for copy-to."""
        return self.conn.execute(f"SELECT {', '.join(KEY_COLUMNS)} FROM api_keys ORDER BY id").fetchall()

    def copy_keys(self, rows):
        """Write keys as key_rows read them from another database, ids kept; new keys get ids above them."""
        for row in rows:
            values = list(row[:5]) + [instant_or_none(value) for value in row[5:]]
            self.conn.execute(f"INSERT INTO api_keys ({', '.join(KEY_COLUMNS)}) VALUES "
                              f"({', '.join([self.PARAM] * len(KEY_COLUMNS))})", [self.column(v) for v in values])
        self.key_counter_past_ids()

    def key_used(self, key_id, now):
        self.conn.execute(f"UPDATE api_keys SET last_used_at = {self.PARAM} WHERE id = {self.PARAM}",
                          (self.column(now), key_id))

    # -- the history: a record's changes in the change log, with who made each ----------------------

    def history(self, kind, record_id):
        """The changes of one record that the log keeps, oldest first: (action, at, record or None,
        who, request id, its place in the log)."""
        rows = self.conn.execute(f"SELECT action, at, record, who, request_id, seq FROM changes WHERE kind = "
                                 f"{self.PARAM} AND id = {self.PARAM} ORDER BY seq", (kind, record_id)).fetchall()
        return [(action, instant_or_none(at),
                 None if data is None else record_from_json(kind, json.loads(data) if isinstance(data, str) else data),
                 who, request_id, seq) for action, at, data, who, request_id, seq in rows]

    def feed_page(self, select, values, limit):
        """The change feed's rows that `select` picks, as (cursor, kind, id, action, at, record or None)."""
        page = []
        for row in self.conn.execute(select + f" LIMIT {int(limit)}", values).fetchall():
            kind, record_id, action, at, data = row[-5:]
            if isinstance(data, str):
                data = json.loads(data)
            page.append((self.cursor(*row[:-5]), kind, record_id, action,
                         at if isinstance(at, datetime) else datetime.fromisoformat(at),
                         None if data is None else record_from_json(kind, data)))
        return page


class SQLiteConnection(RecordRows):
    """One SQLite connection in autocommit mode: every transaction is written out as BEGIN ...
    COMMIT, so that a check and its write sit in one."""

    def __init__(self, target, busy_timeout, unusable=None, before_commit=None):
        """`target`: a file URI (see file_uri) or ":memory:". `unusable` turns a failure to open into
        the error to raise (at start, a ConfigError); without it the driver's error is raised.
        `before_commit` runs inside every write transaction, just before COMMIT: what it raises
        rolls the transaction back, so nothing of it is kept."""
        self.busy_timeout, self.before_commit = busy_timeout, before_commit
        self.written = 0  # records written since the store's write began (one change-log entry each)
        self.seen_version = None  # PRAGMA data_version when the store last caught up through here
        self.pending_version = None
        try:
            self.conn = sqlite3.connect(target, timeout=busy_timeout, isolation_level=None, check_same_thread=False,
                                        uri=True)
            self.conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as error:
            raise (unusable(error) if unusable else error) from None

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
            if write and self.before_commit is not None:
                self.before_commit()
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

    @contextmanager
    def savepoint(self):
        """Statements that can be undone alone, inside the transaction: on any error, undone and raised."""
        self.conn.execute("SAVEPOINT write")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK TO write")
            raise
        finally:
            self.conn.execute("RELEASE write")

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

    # -- records: one row each (see RecordRows), so one entry in the change log each -----------

    PARAM = "?"
    column = staticmethod(to_column)

    @staticmethod
    def record(kind, row):
        return RECORD_FROM_ROW[kind](row)

    def _insert(self, statement, values):
        return self.conn.execute(statement, values).lastrowid

    def _rows(self, select, ids):
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            yield from self.conn.execute(f"{select} WHERE id IN ({', '.join('?' * len(chunk))})", chunk)

    def position(self):
        """The change log's position, and this connection's view of the file (see news) with it."""
        self.seen_version = self.data_version()
        return self.newest_change()

    def is_empty(self):
        return self.conn.execute("SELECT NOT EXISTS (SELECT 1 FROM cars)").fetchone()[0]

    def ping(self):
        self.conn.execute("SELECT count(*) FROM (SELECT 1 FROM dealers LIMIT 1)").fetchone()

    # -- the change log -------------------------------------------------------------------------

    def data_version(self):
        """Changes whenever another connection has committed since the last call."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def news(self, position):
        """Whether the change log has gone past `position`: cheap when no other connection has
        committed since the store last caught up through this one (PRAGMA data_version)."""
        version = self.data_version()
        if version == self.seen_version:
            return False
        if self.newest_change() == position:  # only what the fleet has: the store's own writes
            self.seen_version = version
            return False
        self.pending_version = version  # seen once changes_since has read what came before it
        return True

    def newest_change(self):
        return self.conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]

    # -- the change feed: the log in commit order (one writer at a time, so seq is commit order) ----

    @staticmethod
    def read_cursor(text):
        """A cursor of this engine's feed from its text, or None if it is not one."""
        return int(text) if text.isdigit() and len(text) < 19 else None

    @staticmethod
    def cursor(seq):
        return str(seq)

    def feed(self, after, limit):
        """Up to `limit` changes after cursor `after` (None: from the oldest kept), in commit order, as
        feed_page gives them, and the cursor to follow on from. When `after` is not within the log
        (older than its oldest change, or newer than any): None, and the cursor of its newest change."""
        with self.transaction(write=False):
            oldest, = self.conn.execute("SELECT min(seq) FROM changes").fetchone()
            given, = self.conn.execute("SELECT coalesce(max(seq), 0) FROM sqlite_sequence "
                                       "WHERE name = 'changes'").fetchone()
            start = given if oldest is None else oldest - 1
            if after is None:
                after = start
            elif not start <= after <= given:
                return None, self.cursor(given)
            page = self.feed_page("SELECT seq, kind, id, action, at, record FROM changes WHERE seq > ? ORDER BY seq",
                                  (after,), limit)
        return page, page[-1][0] if page else self.cursor(after)

    def changes_since(self, position):
        """({kind: {id: record, or None when it is gone}} changed after `position`, the newest
        position), read in one transaction; None when the log no longer reaches back that far."""
        with self.transaction(write=False):
            oldest = self.conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
            if oldest is not None and oldest > position + 1:
                return None
            changed = {}
            for position, kind, record_id in self.conn.execute(
                    "SELECT seq, kind, id FROM changes WHERE seq > ? ORDER BY seq", (position,)):
                changed.setdefault(kind, set()).add(record_id)
            changed = {kind: self.records(kind, sorted(ids)) for kind, ids in changed.items()}
        self.seen_version = self.pending_version
        return changed, position

    def id_counters(self):
        """{kind: the highest id ever given to one} (ids are never given twice, even after a delete)."""
        given = dict(self.conn.execute("SELECT name, seq FROM sqlite_sequence"))
        return {kind: given.get(table, 0) for kind, (table, _) in TABLES.items()}

    def key_counter_past_ids(self):
        """Nothing to do: an AUTOINCREMENT table's counter follows the ids written into it."""

    def set_id_counters(self, counters):
        """Give the next record of each kind an id above its counter."""
        for kind, counter in counters.items():
            table = TABLES[kind][0]
            if not self.conn.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = ?",
                                     (counter, table)).rowcount:
                self.conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, counter))

    def after_writes(self, position):
        """The change log's position once what this transaction wrote since `written` was reset is in."""
        return position + self.written

    def lock(self, rows):
        """Nothing to do: BEGIN IMMEDIATE has locked the whole database."""

    def lock_key(self, key):
        """Nothing to do: BEGIN IMMEDIATE has locked the whole database."""

    def prune_change_log(self, before, after, kept_since):
        """Forget the changes made before `kept_since`, all but the newest CHANGE_LOG_KEEP, each time
        the log has grown by CHANGE_LOG_PRUNE_EVERY (its position went from `before` to `after`)."""
        if before // CHANGE_LOG_PRUNE_EVERY != after // CHANGE_LOG_PRUNE_EVERY:
            self.conn.execute("DELETE FROM changes WHERE seq <= ? AND at < ?",
                              (after - CHANGE_LOG_KEEP, kept_since.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"))

    def stamp(self, who, request_id, position):
        """Write who made the changes logged after `position` (one write's), in which request."""
        self.conn.execute("UPDATE changes SET who = ?, request_id = ? WHERE seq > ?", (who, request_id, position))


# -- the write-ahead log, read before SQLite opens the file ------------------------------------
# The first connection to open a database after every process has gone (a crash, a restart)
# rebuilds its index from the WAL (https://www.sqlite.org/fileformat2.html#walformat): it applies
# the frames up to the first one whose salts or cumulative checksum do not match and drops the rest
# in silence, committed or not. After a crash, frames past the last commit (a torn tail) were
# never acknowledged and are rightly dropped; a damaged file can cost committed transactions, so it
# is read first, since opening it would recover and then overwrite it.

WAL_MAGIC = {0x377F0682: False, 0x377F0683: True}  # -> whether its checksums read big-endian words
WAL_VERSION = 3007000
WAL_HEADER, FRAME_HEADER = 32, 24
WAL_INDEX_HEADER = 48  # the -shm file starts with two copies, in the writing machine's byte order


def wal_checksum(data, big_endian, s1=0, s2=0):
    """SQLite's WAL checksum of `data` (a multiple of 8 bytes), continuing from (s1, s2)."""
    if big_endian == (sys.byteorder == "big"):
        words = memoryview(data).cast("I").tolist()
    else:  # the bytes reversed, then the words: each word's bytes swapped, the words in order
        words = memoryview(data[::-1]).cast("I")[::-1].tolist()
    pairs = iter(words)
    for first, second in zip(pairs, pairs):
        s1 = (s1 + first + s2) & 0xFFFFFFFF
        s2 = (s2 + second + s1) & 0xFFFFFFFF
    return s1, s2


def word(data, offset, order="big"):
    """The unsigned 32-bit integer at `offset` (the WAL's own fields are big-endian)."""
    return int.from_bytes(data[offset:offset + 4], order)


def page_size_or_none(size):
    """`size` if SQLite could use it as a page size (a power of two from 512 to 65536), else None."""
    return size if 512 <= size <= 65536 and not size & (size - 1) else None


@dataclass(frozen=True)
class WalHeader:
    page_size: int
    salts: bytes  # frames of this generation of the log carry the same two
    checksum: tuple  # where the frames' cumulative checksum starts
    big_endian: bool


def read_wal_header(data):
    """The WAL's header, or None when SQLite would not accept it (and so drop every frame)."""
    if len(data) < WAL_HEADER or word(data, 0) not in WAL_MAGIC:
        return None
    big_endian, page_size = WAL_MAGIC[word(data, 0)], page_size_or_none(word(data, 8))
    checksum = wal_checksum(data[:24], big_endian)
    if word(data, 4) != WAL_VERSION or page_size is None or checksum != (word(data, 24), word(data, 28)):
        return None
    return WalHeader(page_size, data[16:24], checksum, big_endian)


def wal_index_last_commit(shm, salts):
    """The last frame a committed transaction reached, as the wal-index (the -shm file's first bytes
    `shm`) says; None unless its two header copies agree, are valid and are of this log's generation."""
    order, header = sys.byteorder, shm[:WAL_INDEX_HEADER]
    if (len(shm) < 2 * WAL_INDEX_HEADER or header != shm[WAL_INDEX_HEADER:2 * WAL_INDEX_HEADER]
            or word(header, 0, order) != WAL_VERSION or not header[12] or header[32:40] != salts
            or wal_checksum(header[:40], order == "big") != (word(header, 40, order), word(header, 44, order))):
        return None
    return word(header, 16, order)


def commit_frames(wal, frame_size, salts, first, last):
    """The numbers of the frames `first` to `last` of `wal` that carry `salts` (are of that
    generation of the log) and end a commit, read from their headers alone."""
    found = []
    for number in range(first, last + 1):
        wal.seek(WAL_HEADER + (number - 1) * frame_size)
        frame = wal.read(16)
        if frame[8:16] == salts and word(frame, 4):
            found.append(number)
    return found


@dataclass(frozen=True)
class WalFrames:
    """What SQLite's recovery makes of a log's frames, and the commits it would drop."""
    count: int  # complete frames in the file
    applied: int  # the last frame SQLite applies: the last commit before the first frame it refuses
    refused: int  # the first frame it refuses (count + 1 if none)
    dropped_commits: list  # that frame and those after it, of this generation, that end a commit


def scan_wal_frames(wal, header, size):
    """Walk the frames of `wal` (a file, just past its header) as SQLite's recovery does, then on
    past the first refused one for commits of this generation."""
    frame_size, checksum = FRAME_HEADER + header.page_size, header.checksum
    count = (size - WAL_HEADER) // frame_size
    applied = 0
    for number in range(1, count + 1):
        frame = wal.read(frame_size)
        checksum = wal_checksum(frame[:8] + frame[FRAME_HEADER:], header.big_endian, *checksum)
        if frame[8:16] != header.salts or not word(frame, 0) or checksum != (word(frame, 16), word(frame, 20)):
            return WalFrames(count, applied, number, commit_frames(wal, frame_size, header.salts, number, count))
        if word(frame, 4):
            applied = number
    return WalFrames(count, applied, count + 1, [])


def frames_loss(frames, indexed, page_size, size):
    """The committed transactions a recovery would drop, in words (see wal_loss), or None: those
    after the first refused frame, and those the wal-index says reached frame `indexed` (None if
    unknown) that the file no longer holds. Frames after the last commit are a torn tail: no loss."""
    lost_until = max([n for n in frames.dropped_commits if n > frames.refused] + [indexed or 0])
    if lost_until <= frames.applied:
        return None
    frame_size = FRAME_HEADER + page_size
    kept, missing = WAL_HEADER + frames.applied * frame_size, max(0, WAL_HEADER + lost_until * frame_size - size)
    commits = sum(n <= lost_until for n in frames.dropped_commits) + (1 if missing else 0)
    what = []
    if frames.refused <= frames.count:
        what.append(f"frame {frames.refused} of {frames.count} is damaged")
    if missing:
        what.append(f"the file is cut short ({frames.count} whole frames, where the wal-index says committed "
                    f"frames reach frame {lost_until})")
    return (f"{', and '.join(what)}: {'at least ' if missing else ''}{plural(commits, 'committed transaction')} "
            f"would be dropped (frames {frames.applied + 1} to {lost_until}: the last {size - kept:,} bytes of the file"
            + (f" and the {missing:,} it is missing)" if missing else ")"))


def damaged_header_loss(wal, path, size):
    """What a recovery would drop of a log whose header it refuses (all of it), in words. How many
    commits that is needs the page size: the header's if it makes sense, else the database's."""
    wal.seek(0)
    page_size = page_size_or_none(word(wal.read(WAL_HEADER), 8))
    if page_size is None:
        try:
            with open(path, "rb") as database:
                stored = int.from_bytes(database.read(18)[16:18], "big")
            page_size = page_size_or_none(65536 if stored == 1 else stored)
        except OSError:
            pass
    what, dropped = "its header is damaged, so every frame would be dropped", f"{size - WAL_HEADER:,} bytes"
    if page_size is None or size < WAL_HEADER + FRAME_HEADER + page_size:
        return f"{what} ({dropped})"
    count = (size - WAL_HEADER) // (FRAME_HEADER + page_size)
    wal.seek(WAL_HEADER + 8)
    salts = wal.read(8)  # the first frame is always of the log's latest generation
    commits = commit_frames(wal, FRAME_HEADER + page_size, salts, 1, count)
    return f"{what}: {plural(len(commits), 'committed transaction')} (frames 1 to {count}: {dropped})"


def orphan_loss(wal, header, frames):
    """What SQLite drops of an intact log beside a database file that is missing or empty (all of
    it: it deletes the log), in words."""
    commits = commit_frames(wal, FRAME_HEADER + header.page_size, header.salts, 1, frames.applied)
    return (f"the database file is missing or empty, so the whole log would be dropped: "
            f"{plural(len(commits), 'committed transaction')} (frames 1 to {frames.applied})")


def wal_loss(path):
    """What SQLite would drop in silence, of what was committed, from the WAL beside the database
    at `path` when it opens it: one line, or None when that is nothing (no log, an intact one, a torn
    tail). The wal-index (-shm) is read first: a live writer updates it only after writing its frames."""
    try:
        with open(f"{path}-shm", "rb") as shm:
            index = shm.read(2 * WAL_INDEX_HEADER)
    except FileNotFoundError:
        index = b""
    try:
        with open(f"{path}-wal", "rb") as wal:
            size = os.fstat(wal.fileno()).st_size
            if size <= WAL_HEADER:  # empty, or a header torn as the log began: nothing was committed to it
                return None
            header = read_wal_header(wal.read(WAL_HEADER))
            if header is None:
                return damaged_header_loss(wal, path, size)
            frames = scan_wal_frames(wal, header, size)
            if frames.applied and not (os.path.exists(path) and os.path.getsize(path)):
                return orphan_loss(wal, header, frames)
    except FileNotFoundError:
        return None
    return frames_loss(frames, wal_index_last_commit(index, header.salts), header.page_size, size)


class SQLiteEngine:
    """The database file (or memory) of one store, and its connections.

    The write connection is used by one batch of writes at a time (the store's write lock). On a
    file, each thread that serves requests also has a read connection of its own (`reader()`), to
    see whether another process has committed and to catch up, so that a reader never waits for a
    writer's COMMIT nor for another reader. In memory there is only the write connection, as no
    other process can write. Opening a file checks it (ours, not newer, not damaged), takes the
    schema's steps it lacks and puts it in WAL mode; any problem is a ConfigError.

    Only the write connection, at start and with `create`, may create the file (SQLite's URI
    mode=rwc; every other connection opens it with mode=rw). The engine remembers which file it
    opened (device and inode): a write batch checks that the file at the path is still that one
    before its COMMIT, and so does ping(). Deleted, moved or replaced, it raises FileNotAtPath, and
    nothing is kept: a connection opened afresh would otherwise write to (or create) another file
    than the one every record in memory came from.

    Before SQLite opens a file, its WAL is read (see wal_loss): if SQLite would drop committed
    transactions from it, the engine refuses to open it (a ConfigError), unless `accept_wal_loss`.
    """
    Error = sqlite3.Error
    read_cursor = staticmethod(SQLiteConnection.read_cursor)  # a cursor of the change feed from its text

    def __init__(self, path, synchronous="full", busy_timeout=5.0, create=True, accept_wal_loss=False):
        self.name = path
        self.shared = path != MEMORY  # a file can have other processes (or apps) on it
        self.busy_timeout = busy_timeout
        self._readers = threading.local()
        self._writing = threading.Lock()  # the write connection, used by one thread at a time
        if self.shared and not create and not os.path.exists(path):
            raise ConfigError(f"DEALERSHIP_DATABASE={path!r} does not exist, though the service made or found it "
                              "at start: it was deleted or moved since. Put it back, or restart the service.")
        loss_accepted = self.shared and self._check_wal(accept_wal_loss)
        target = file_uri(path, "rwc" if create else "rw") if self.shared else path
        self._writer = SQLiteConnection(target, busy_timeout, self.unusable, before_commit=self.check_file)
        self.identity = self._identity() if self.shared else None
        try:
            self._prepare(self._writer.conn, synchronous)
            self._writer.conn.execute("PRAGMA busy_timeout = 0")  # see SQLiteConnection._begin_immediate
            if loss_accepted:  # what SQLite kept, into the file; the log emptied, so its damage is not found again
                self._writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as error:
            self._writer.conn.close()
            raise self.unusable(error) from None
        except ConfigError:
            self._writer.conn.close()
            raise

    @contextmanager
    def writer(self):
        """The write connection, for one thread at a time."""
        with self._writing:
            yield self._writer

    @contextmanager
    def reader(self):
        """This thread's read connection to the file, opened on first use. In memory, and when this
        thread cannot open one (the file is gone from its path, say), the write connection, which
        has had the file open since the start: every process then answers with all that was
        committed to that file, as the others do."""
        reader = getattr(self._readers, "connection", None)
        if reader is None and self.shared:
            try:
                reader = self._open_reader()
            except sqlite3.Error:
                reader = None
        if reader is None:
            with self.writer() as writer:
                yield writer
        else:
            yield reader

    def _open_reader(self):
        reader = SQLiteConnection(file_uri(self.name, "rw"), self.busy_timeout)
        try:
            self.check_file()  # what it opened must be the file every record came from
        except FileNotAtPath:
            reader.conn.close()
            raise
        reader.conn.execute("PRAGMA query_only = ON")
        self._readers.connection = reader
        return reader

    @staticmethod
    def combine(position, other):
        """The change log's position of a fleet with what both positions hold."""
        return max(position, other)

    @staticmethod
    def retryable(error):
        """SQLite's write lock is taken first (BEGIN IMMEDIATE): a transaction is never broken off
        halfway to let another through."""
        return False

    def _check_wal(self, accept_loss):
        """Refuse a file whose WAL SQLite would cut committed transactions from, leaving the log as it
        is; or, when the loss is accepted, say what is dropped and return True."""
        wal = f"{self.name}-wal"
        try:
            loss = wal_loss(self.name)
            if loss is not None:  # a process writing the log right now can make one reading see half a commit
                time.sleep(0.1)
                loss = wal_loss(self.name)
        except OSError as error:
            raise ConfigError(f"DEALERSHIP_DATABASE={self.name!r}: its write-ahead log {wal!r} cannot be read "
                              f"({error}): check the permissions of the file and its folder.") from None
        if loss is None:
            return False
        if not accept_loss:
            raise ConfigError(f"DEALERSHIP_DATABASE={self.name!r}: SQLite would drop committed transactions from "
                              f"its write-ahead log {wal!r} without a word: {loss}. The log is left as it is: copy "
                              "the database and its -wal and -shm files aside, then restore a backup (see the README), "
                              "or set DEALERSHIP_ACCEPT_WAL_LOSS=1 to start without them.")
        log.warning("%s: starting without what SQLite drops from its damaged write-ahead log, as "
                    "DEALERSHIP_ACCEPT_WAL_LOSS says: %s", self.name, loss)
        return True

    def _identity(self):
        """The device and inode of the file at the path now; None when there is none."""
        try:
            found = os.stat(self.name)
        except OSError:
            return None
        return found.st_dev, found.st_ino

    def check_file(self):
        """Raise FileNotAtPath unless the file at the path is still the one this engine opened."""
        if self.shared and self._identity() != self.identity:
            raise FileNotAtPath(self.name)

    def _prepare(self, conn, synchronous):
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]  # "not a database" shows here
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id or tables):
            raise ConfigError(f"DEALERSHIP_DATABASE={self.name!r} is a SQLite database of another "
                              "application: point the setting at the service's own file, or at a "
                              "path that does not exist yet to start afresh.")
        if version > SCHEMA_VERSION:
            raise ConfigError(f"DEALERSHIP_DATABASE={self.name!r} was written by a newer version of "
                              f"the service (schema {version}; this one knows up to {SCHEMA_VERSION}): "
                              "run that version, or restore a backup made by this one.")
        if self.shared and tables:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise self.unusable(problems[0])
        if self.shared and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # readers never wait for a writer
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        if version < SCHEMA_VERSION:
            self._upgrade()

    def _upgrade(self):
        with self.writer() as writer, writer.transaction(write=True) as db:
            version = db.conn.execute("PRAGMA user_version").fetchone()[0]  # another process may have
            for step in SCHEMA_STEPS[version:]:
                db.script(step.sql)
                if step.fill is not None:
                    step.fill(db.conn)
            if version == 0:
                db.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.insert("dealer", SEED_DEALER)
            db.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        if version == 0:
            log.info("%s: new database, schema version %d", self.name, SCHEMA_VERSION)
        elif version < SCHEMA_VERSION:
            log.info("%s: schema upgraded from version %d to %d", self.name, version, SCHEMA_VERSION)

    def unusable(self, error):
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
        return ConfigError(f"DEALERSHIP_DATABASE={self.name!r} {what}.")

    def client_error(self, error):
        """What a client is told when SQLite refuses a write: a 409 for a constraint, else a 503
        (nothing changed, try again later)."""
        code = getattr(error, "sqlite_errorname", "")
        if isinstance(error, sqlite3.IntegrityError):
            return ConflictError(f"The change conflicts with the stored data ({error}); nothing was changed.")
        if isinstance(error, FileNotAtPath):
            return StorageUnavailable(f"The database cannot take the change: {error}. Nothing was changed; "
                                      "reads are answered as before.", 60)
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
        return StorageUnavailable(detail, retry)

    def ping(self):
        """A trivial read of the file this engine opened; raises sqlite3.Error when the database does
        not answer, or FileNotAtPath when that file is no longer at the path."""
        self.check_file()
        with self.reader() as db:
            db.ping()
        return {}

    def close(self):
        """Close the write connection, and this thread's read connection."""
        self._writer.conn.close()
        reader = getattr(self._readers, "connection", None)
        if reader is not None:
            reader.conn.close()

    def backup(self, target):
        """A consistent copy of the database at `target`, taken while the service runs (SQLite's
        online backup), written beside it first and then renamed, so `target` is never half a copy."""
        partial = f"{target}.partial"
        source = sqlite3.connect(file_uri(self.name, "rw"), timeout=30, uri=True)  # never a new, empty file
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


# -- PostgreSQL: one database for any number of machines ----------------------------------------
# The same tables, and a change log that other processes read to catch up. A sequence number is
# taken at INSERT, not at COMMIT, so "the largest I have seen" would miss a transaction that commits
# after a later one: each change records its transaction id instead, and a process reads the log
# from the oldest transaction still running when it last looked (its snapshot's xmin, the horizon;
# see HORIZON_SQL for what a crash changes), skipping those it has applied. The bookings and
# maintenance windows of a car are kept apart by an exclusion constraint as well as by the
# service's own checks, across every connection anywhere.

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
POSTGRES_STATEMENT_TIMEOUT = 30  # seconds: a statement that runs longer is cancelled (503)
POSTGRES_IDLE_IN_TRANSACTION = 60  # seconds: a connection left in a transaction is closed
POSTGRES_DOWN_PAUSE = 1.0  # seconds: after the pool could lend no connection, requests for one fail at once
POSTGRES_FAILING_WAIT = 0.25  # seconds a request waits for the pool once a connection was lost (else the busy timeout)
POSTGRES_HEALTH_WAIT = 1.0  # seconds /health waits for the pool: a probe's answer within its usual 1 s timeout
POSTGRES_RETRY = {"40P01", "40001", "23P01"}  # deadlock, serialization failure, exclusion: run again
POSTGRES_GONE = {"57P01", "57P02", "57P03"}  # the server shut down or ended the connection


def connection_lost(error):
    """Whether the database did not answer at all (or ended the connection): not a refusal of its own."""
    return isinstance(error, psycopg.OperationalError) and \
        (error.sqlstate is None or error.sqlstate.startswith("08") or error.sqlstate in POSTGRES_GONE)


POSTGRES_SCHEMA_STEPS = [
    SchemaStep("""
    CREATE EXTENSION IF NOT EXISTS btree_gist;
    CREATE TABLE dealers (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name text NOT NULL,
        location text NOT NULL,
        turnaround_minutes integer NOT NULL DEFAULT 0 CHECK (turnaround_minutes BETWEEN 0 AND 1440)
    );
    CREATE TABLE cars (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        brand text NOT NULL,
        model text NOT NULL,
        year integer NOT NULL,
        color text NOT NULL,
        daily_price double precision NOT NULL CHECK (daily_price > 0),
        vin text NOT NULL UNIQUE,
        status text NOT NULL CHECK (status IN ('available', 'maintenance')),
        dealer_id bigint NOT NULL REFERENCES dealers (id)
    );
    CREATE INDEX ON cars (dealer_id);
    CREATE TABLE bookings (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        car_id bigint NOT NULL REFERENCES cars (id),
        customer_name text NOT NULL,
        customer_email text NOT NULL,
        start_datetime timestamptz NOT NULL,
        end_datetime timestamptz NOT NULL,
        total_cents bigint NOT NULL DEFAULT 0 CHECK (total_cents >= 0),
        CHECK (end_datetime > start_datetime)
    );
    CREATE INDEX ON bookings (car_id);
    CREATE TABLE maintenance_windows (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        car_id bigint NOT NULL REFERENCES cars (id),
        start_datetime timestamptz NOT NULL,
        end_datetime timestamptz NOT NULL,
        note text NOT NULL DEFAULT '',
        CHECK (end_datetime > start_datetime)
    );
    CREATE INDEX ON maintenance_windows (car_id);

    -- Each booking and window blocks [start, end + the turnaround it was written with) of its car:
    -- two entries overlap there exactly when they are closer than the earlier one's turnaround.
    -- Kept by triggers, whoever writes; a lower turnaround shrinks what is blocked, a higher one
    -- applies to entries written from then on (those already there stay valid).
    CREATE TABLE blocked_periods (
        car_id bigint NOT NULL,
        booking_id bigint UNIQUE REFERENCES bookings (id) ON DELETE CASCADE,
        window_id bigint UNIQUE REFERENCES maintenance_windows (id) ON DELETE CASCADE,
        turnaround_minutes integer NOT NULL,
        period tstzrange NOT NULL,
        CHECK (num_nonnulls(booking_id, window_id) = 1),
        CONSTRAINT one_entry_at_a_time EXCLUDE USING gist (car_id WITH =, period WITH &&)
    );
    CREATE FUNCTION block_period() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        pad integer;
        entry_booking bigint := CASE TG_ARGV[0] WHEN 'booking' THEN NEW.id END;
        entry_window bigint := CASE TG_ARGV[0] WHEN 'window' THEN NEW.id END;
    BEGIN
        -- the turnaround as committed, kept until this transaction ends: a change of it waits
        SELECT d.turnaround_minutes INTO pad FROM cars c JOIN dealers d ON d.id = c.dealer_id
        WHERE c.id = NEW.car_id FOR SHARE OF d;
        DELETE FROM blocked_periods WHERE booking_id = entry_booking OR window_id = entry_window;
        INSERT INTO blocked_periods (car_id, booking_id, window_id, turnaround_minutes, period)
        VALUES (NEW.car_id, entry_booking, entry_window, pad,
                tstzrange(NEW.start_datetime, NEW.end_datetime + make_interval(mins => pad)));
        RETURN NULL;
    END $$;
    CREATE TRIGGER bookings_block AFTER INSERT ON bookings
        FOR EACH ROW EXECUTE FUNCTION block_period('booking');
    CREATE TRIGGER bookings_move AFTER UPDATE ON bookings FOR EACH ROW
        WHEN ((OLD.car_id, OLD.start_datetime, OLD.end_datetime) IS DISTINCT FROM
              (NEW.car_id, NEW.start_datetime, NEW.end_datetime))
        EXECUTE FUNCTION block_period('booking');
    CREATE TRIGGER windows_block AFTER INSERT ON maintenance_windows
        FOR EACH ROW EXECUTE FUNCTION block_period('window');
    CREATE TRIGGER windows_move AFTER UPDATE ON maintenance_windows FOR EACH ROW
        WHEN ((OLD.car_id, OLD.start_datetime, OLD.end_datetime) IS DISTINCT FROM
              (NEW.car_id, NEW.start_datetime, NEW.end_datetime))
        EXECUTE FUNCTION block_period('window');
    CREATE FUNCTION shrink_turnarounds() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE blocked_periods b
        SET period = tstzrange(lower(b.period), upper(b.period)
                               - make_interval(mins => b.turnaround_minutes - d.turnaround_minutes)),
            turnaround_minutes = d.turnaround_minutes
        FROM cars c JOIN dealers d ON d.id = c.dealer_id
        WHERE b.car_id = c.id AND b.turnaround_minutes > d.turnaround_minutes
          AND CASE TG_TABLE_NAME WHEN 'dealers' THEN d.id = NEW.id ELSE c.id = NEW.id END;
        RETURN NULL;
    END $$;
    CREATE TRIGGER dealers_turnaround AFTER UPDATE ON dealers FOR EACH ROW
        WHEN (NEW.turnaround_minutes < OLD.turnaround_minutes) EXECUTE FUNCTION shrink_turnarounds();
    CREATE TRIGGER cars_dealer AFTER UPDATE ON cars FOR EACH ROW
        WHEN (NEW.dealer_id <> OLD.dealer_id) EXECUTE FUNCTION shrink_turnarounds();

    -- One row per changed record, with the transaction that changed it: what other processes read
    -- to catch up. Rows of transactions below `below` may have been pruned.
    CREATE TABLE changes (
        seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
        kind text NOT NULL,
        id bigint NOT NULL
    );
    CREATE INDEX ON changes (xid);
    CREATE TABLE change_log_start (below xid8 NOT NULL);
    INSERT INTO change_log_start VALUES ('0');
    CREATE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO changes (kind, id) VALUES (TG_ARGV[0], CASE TG_OP WHEN 'DELETE' THEN OLD.id ELSE NEW.id END);
        RETURN NULL;
    END $$;
    """ + "".join(f"""
    CREATE TRIGGER {table}_log AFTER INSERT OR UPDATE OR DELETE ON {table}
        FOR EACH ROW EXECUTE FUNCTION log_change('{kind}');""" for kind, (table, _) in list(TABLES.items())[:4])),
    # Versions (ETags), holds, the change feed and the answers kept for Idempotency-Key. The feed
    # follows commit order: each transaction that logs a change takes the next tick of commit_clock
    # as it commits (a deferred trigger), holding the clock's row until its COMMIT ends, so a tick is
    # only handed out once every lower one has committed: a reader never sees a tick before a lower one.
    SchemaStep("""
    ALTER TABLE dealers ADD COLUMN version bigint NOT NULL DEFAULT 1;
    ALTER TABLE cars ADD COLUMN version bigint NOT NULL DEFAULT 1;
    ALTER TABLE bookings ADD COLUMN version bigint NOT NULL DEFAULT 1;
    ALTER TABLE maintenance_windows ADD COLUMN version bigint NOT NULL DEFAULT 1;
    CREATE TABLE holds (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        car_id bigint NOT NULL REFERENCES cars (id),
        start_datetime timestamptz NOT NULL,
        end_datetime timestamptz NOT NULL,
        expires_at timestamptz NOT NULL,
        CHECK (end_datetime > start_datetime)
    );
    CREATE INDEX ON holds (car_id);
    CREATE TRIGGER holds_log AFTER INSERT OR UPDATE OR DELETE ON holds
        FOR EACH ROW EXECUTE FUNCTION log_change('hold');
    ALTER TABLE changes ADD COLUMN action text NOT NULL DEFAULT 'changed',
        ADD COLUMN at timestamptz NOT NULL DEFAULT now(), ADD COLUMN record jsonb;
    UPDATE changes c SET record = CASE c.kind """ + " ".join(
        f"WHEN '{kind}' THEN (SELECT to_jsonb(r) FROM {table} r WHERE r.id = c.id)"
        for kind, (table, _) in TABLES.items()) + """ END;
    UPDATE changes SET action = CASE WHEN record IS NULL THEN 'deleted' ELSE 'changed' END;
    CREATE OR REPLACE FUNCTION log_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO changes (kind, id, action, record)
        VALUES (TG_ARGV[0], CASE TG_OP WHEN 'DELETE' THEN OLD.id ELSE NEW.id END,
                CASE TG_OP """ + " ".join(f"WHEN '{op}' THEN '{action}'" for op, action in FEED_ACTIONS.items()) + """ END,
                CASE TG_OP WHEN 'DELETE' THEN NULL ELSE to_jsonb(NEW) END);
        RETURN NULL;
    END $$;
    CREATE TABLE commit_clock (tick bigint NOT NULL);
    CREATE TABLE commits (tick bigint PRIMARY KEY, xid xid8 NOT NULL UNIQUE);
    INSERT INTO commits SELECT row_number() OVER (ORDER BY min(seq)), xid FROM changes GROUP BY xid;
    INSERT INTO commit_clock SELECT count(*) FROM commits;
    ALTER TABLE change_log_start ADD COLUMN below_tick bigint NOT NULL DEFAULT 0;
    CREATE FUNCTION stamp_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NOT EXISTS (SELECT 1 FROM commits WHERE xid = NEW.xid) THEN
            WITH next AS (UPDATE commit_clock SET tick = tick + 1 RETURNING tick)
            INSERT INTO commits SELECT tick, NEW.xid FROM next;
        END IF;
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER changes_commit AFTER INSERT ON changes DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION stamp_commit();
    CREATE TABLE idempotency_keys (
        key text PRIMARY KEY,
        fingerprint text NOT NULL,
        status integer NOT NULL,
        headers text NOT NULL,
        body bytea NOT NULL,
        created_at timestamptz NOT NULL
    );
    CREATE INDEX ON idempotency_keys (created_at);
    """),
    # Keys per role (only a hash of each secret), the key that made each booking and hold, and the
    # history: which key made each change, in which request.
    SchemaStep("""
    ALTER TABLE bookings ADD COLUMN made_by text;
    ALTER TABLE holds ADD COLUMN made_by text;
    ALTER TABLE changes ADD COLUMN who text, ADD COLUMN request_id text;
    CREATE INDEX ON changes (kind, id);
    CREATE TABLE api_keys (
        id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        role text NOT NULL CHECK (role IN ('admin', 'staff', 'booking')),
        dealer_id bigint,
        note text NOT NULL DEFAULT '',
        secret_hash text NOT NULL,
        created_at timestamptz NOT NULL,
        last_used_at timestamptz,
        revoked_at timestamptz,
        CHECK ((role = 'staff') = (dealer_id IS NOT NULL))
    );
    """),
]
POSTGRES_SCHEMA_VERSION = len(POSTGRES_SCHEMA_STEPS)


# The horizon of a snapshot: the oldest transaction still running (all below it have ended), and the
# newest one in the log. After a crash PostgreSQL may hand out again the ids of transactions that
# never committed (nothing of them reached its log), though a process saw them as ended; a committed
# one's id it never hands out again. So the horizon is never above the newest logged one + 1.
HORIZON_SQL = ("pg_snapshot_xmin(pg_current_snapshot())::text, "
               "(SELECT newest.xid::text FROM changes newest ORDER BY newest.xid DESC LIMIT 1)")
# Each change not yet applied, with its record as it stands (JSON, or null once it is gone).
CHANGES_QUERY = (f"SELECT {HORIZON_SQL}, (SELECT below::text FROM change_log_start), c.xid::text, c.kind, c.id, "
                 "CASE c.kind " + " ".join(f"WHEN '{kind}' THEN (SELECT to_jsonb(r) FROM {table} r WHERE r.id = c.id)"
                                           for kind, (table, _) in TABLES.items()) +
                 " END FROM (SELECT 1) one LEFT JOIN changes c ON c.xid >= %s::xid8")
NEWS_STATEMENT = b"dealership_news"  # see PostgresConnection.news
NEWS_QUERY = f"SELECT {HORIZON_SQL}, (SELECT string_agg(DISTINCT xid::text, ',') FROM changes WHERE xid >= %s::xid8)"


def log_horizon(xmin, newest):
    """The horizon from a snapshot's xmin and the newest transaction id in the log (text, or None)."""
    return int(xmin) if newest is None else min(int(xmin), int(newest) + 1)


@dataclass(frozen=True)
class LogPosition:
    """What of PostgreSQL's change log a fleet holds: every transaction below `horizon` (finished when
    it was read), and those at or above it in `applied`."""
    horizon: int
    applied: frozenset = frozenset()

    def combine(self, other):
        """The position of a fleet with what both hold."""
        horizon = max(self.horizon, other.horizon)
        return LogPosition(horizon, frozenset(x for x in self.applied | other.applied if x >= horizon))


class OutcomeUnknown(psycopg.OperationalError):
    """The connection was lost while the database committed: the change may or may not be in."""


class PostgresConnection(RecordRows):
    """One PostgreSQL connection lent by the pool, in autocommit mode: every transaction is written
    out as BEGIN ... COMMIT, as on SQLite."""

    def __init__(self, conn, engine):
        self.conn, self.engine, self.written, self._xid = conn, engine, 0, None

    @contextmanager
    def transaction(self, write):
        """BEGIN (read committed: each statement sees what was committed before it, after the locks
        it waited for) or a read-only snapshot ... COMMIT; ROLLBACK on any error. A connection lost
        during COMMIT raises OutcomeUnknown. Inside another transaction, that one is used."""
        if self.conn.info.transaction_status != TransactionStatus.IDLE:
            yield self
            return
        self.conn.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        self._xid = None
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        try:
            self.conn.execute("COMMIT")
        except psycopg.OperationalError as error:
            if self.conn.broken:
                raise OutcomeUnknown(f"the connection was lost during COMMIT ({error})") from error
            raise

    @contextmanager
    def savepoint(self):
        """Statements that can be undone alone, inside the transaction: on any error, undone and raised."""
        self.conn.execute("SAVEPOINT write")
        try:
            yield
        except BaseException:
            try:
                self.conn.execute("ROLLBACK TO SAVEPOINT write")
                self.conn.execute("RELEASE SAVEPOINT write")
            except psycopg.Error:
                pass  # the transaction itself is lost: the error raised says why
            raise
        self.conn.execute("RELEASE SAVEPOINT write")

    def rollback(self):
        if not self.conn.broken and self.conn.info.transaction_status != TransactionStatus.IDLE:
            try:
                self.conn.execute("ROLLBACK")
            except psycopg.Error:
                pass  # the pool closes a connection it cannot reset

    # -- records: one row each (see RecordRows) --------------------------------------------------

    PARAM = "%s"

    @staticmethod
    def column(value):
        return value  # psycopg writes a datetime as a timestamptz

    @staticmethod
    def record(kind, row):
        return RECORD_TYPES[kind](*row)

    def _insert(self, statement, values):
        return self.conn.execute(statement + " RETURNING id", values).fetchone()[0]

    def _rows(self, select, ids):
        return self.conn.execute(f"{select} WHERE id = ANY(%s)", (list(ids),))

    def load(self):
        """Every record and the change log's position (see RecordRows.load), not inside a write
        transaction, whose statements each see another snapshot: there it raises a serialization
        failure, and the write runs again once the store has loaded afresh."""
        if self.conn.info.transaction_status != TransactionStatus.IDLE:
            raise psycopg.errors.SerializationFailure("the change log no longer reaches back to this process's "
                                                      "position: it loads everything again before the write")
        return super().load()

    def position(self):
        horizon = log_horizon(*self.conn.execute(f"SELECT {HORIZON_SQL}").fetchone())
        xids = self.conn.execute("SELECT DISTINCT xid::text FROM changes WHERE xid >= %s::xid8",
                                 (str(horizon),)).fetchall()
        return LogPosition(horizon, frozenset(int(xid) for xid, in xids))

    def is_empty(self):
        return self.conn.execute("SELECT NOT EXISTS (SELECT 1 FROM cars)").fetchone()[0]

    def ping(self):
        self.conn.execute("SELECT count(*) FROM (SELECT 1 FROM dealers LIMIT 1) d").fetchone()

    def id_counters(self):
        """{kind: the highest id ever given to one} (ids are never given twice, even after a delete)."""
        return {kind: self.conn.execute(
            "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence(%s, 'id')::regclass), 0)",
            (table,)).fetchone()[0] for kind, (table, _) in TABLES.items()}

    def key_counter_past_ids(self):
        """New keys get ids above those written into the table."""
        self.conn.execute("SELECT setval(pg_get_serial_sequence('api_keys', 'id'), greatest(max(id), 1), max(id) "
                          "IS NOT NULL) FROM api_keys")

    def set_id_counters(self, counters):
        """Give the next record of each kind an id above its counter."""
        for kind, counter in counters.items():
            self.conn.execute("SELECT setval(pg_get_serial_sequence(%s, 'id'), greatest(%s, 1), %s > 0)",
                              (TABLES[kind][0], counter, counter))

    def lock(self, rows):
        """Lock these rows ((kind, id) pairs: dealers, then cars, each in id order) until the
        transaction ends: writers of other processes to the same records wait here, before they
        catch up and check. A dealer's row is locked against changes but not against new cars."""
        for kind, strength in (("dealer", "NO KEY UPDATE"), ("car", "UPDATE")):
            ids = sorted(record_id for of, record_id in rows if of == kind)
            if ids:
                self.conn.execute(f"SELECT id FROM {TABLES[kind][0]} WHERE id = ANY(%s) ORDER BY id FOR {strength}",
                                  (ids,))

    def lock_key(self, key):
        """Wait for any other transaction working under the same Idempotency-Key, until it ends."""
        self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))

    # -- the change log -------------------------------------------------------------------------

    def news(self, position):
        """Whether the log holds a transaction the fleet at `position` has not applied, or its horizon
        can move on: one query on the index of the log, in one snapshot. Outside a transaction it is
        the one statement of a request, so it goes to libpq straight as a prepared statement (through
        psycopg's cursor it takes twice as long), prepared again whenever the server has forgotten it
        (psycopg deallocates every prepared statement after a ROLLBACK)."""
        if self.conn.info.transaction_status != TransactionStatus.IDLE:
            xmin, newest, xids = self.conn.execute(NEWS_QUERY, (str(position.horizon),)).fetchone()
        else:
            xmin, newest, xids = self._news_prepared(b"%d" % position.horizon)
        return log_horizon(xmin, newest) != position.horizon or \
            bool(xids and not set(map(int, xids.split(","))) <= position.applied)

    def _news_prepared(self, horizon):
        pgconn = self.conn.pgconn
        result = pgconn.exec_prepared(NEWS_STATEMENT, [horizon])
        if result.status != ExecStatus.TUPLES_OK and result.error_field(DiagnosticField.SQLSTATE) == b"26000":
            prepared = pgconn.prepare(NEWS_STATEMENT, NEWS_QUERY.replace("%s", "$1").encode())
            if prepared.status != ExecStatus.COMMAND_OK:
                raise self._failure(prepared)
            result = pgconn.exec_prepared(NEWS_STATEMENT, [horizon])
        if result.status != ExecStatus.TUPLES_OK:
            raise self._failure(result)
        return [value and value.decode() for value in (result.get_value(0, column) for column in range(3))]

    def _failure(self, result):
        """The error of a result that libpq gave straight: an OperationalError, as psycopg raises it,
        when the connection itself is gone (a result without a SQLSTATE would otherwise be taken
        for a refusal, and the broken connection lent again)."""
        if self.conn.pgconn.status != ConnStatus.OK:
            message = self.conn.pgconn.error_message.decode(errors="replace").strip()
            return psycopg.OperationalError(message or "the connection to the server was lost")
        return psycopg.errors.error_from_result(result)

    def changes_since(self, position):
        """({kind: {id: record, or None when it is gone}} changed by transactions that `position` has
        not applied, the position with them), or None when the log no longer reaches back that far,
        or the server's transaction ids went back (a failover, a restore): then load everything.
        The horizon, the log and the records are read in one statement, so in one snapshot, even
        inside a write transaction (where each statement has a snapshot of its own)."""
        rows = self.conn.execute(CHANGES_QUERY, (str(position.horizon),)).fetchall()
        horizon, start = log_horizon(rows[0][0], rows[0][1]), int(rows[0][2])
        if position.horizon < start or horizon < position.horizon:
            return None
        changed, seen = {}, set()
        for *_, xid, kind, record_id, data in rows:
            if xid is not None:
                seen.add(int(xid))
                if int(xid) not in position.applied:
                    changed.setdefault(kind, {})[record_id] = data and record_from_json(kind, data)
        changed = {kind: dict(sorted(records.items())) for kind, records in changed.items()}
        return changed, position.combine(LogPosition(horizon, frozenset(seen)))

    # -- the change feed: the log in commit order, by the tick each transaction took as it committed --

    @staticmethod
    def read_cursor(text):
        tick, dot, seq = text.partition(".")
        return (int(tick), int(seq)) if dot and tick.isdigit() and seq.isdigit() and len(text) < 38 else None

    @staticmethod
    def cursor(tick, seq):
        return f"{tick}.{seq}"

    def feed(self, after, limit):
        """As SQLiteConnection.feed, in one snapshot: every tick up to commit_clock's has committed in it."""
        with self.transaction(write=False):
            below, given = self.conn.execute("SELECT (SELECT below_tick FROM change_log_start), "
                                             "(SELECT tick FROM commit_clock)").fetchone()
            if after is None:
                after = (below, 0)
            elif not below <= after[0] <= given:
                newest, = self.conn.execute("SELECT coalesce(max(c.seq), 0) FROM commits t JOIN changes c "
                                            "ON c.xid = t.xid WHERE t.tick = %s", (given,)).fetchone()
                return None, self.cursor(given, newest)
            page = self.feed_page("SELECT t.tick, c.seq, c.kind, c.id, c.action, c.at, c.record FROM commits t "
                                  "JOIN changes c ON c.xid = t.xid WHERE t.tick >= %s AND (t.tick, c.seq) > (%s, %s) "
                                  "ORDER BY t.tick, c.seq", (after[0], after[0], after[1]), limit)
        return page, page[-1][0] if page else self.cursor(*after)

    def after_writes(self, position):
        """`position` with this transaction in it, once it has written anything."""
        if not self.written:
            return position
        if self._xid is None:
            self._xid = int(self.conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0])
        return LogPosition(position.horizon, position.applied | {self._xid})

    def prune_change_log(self, before, after, kept_since):
        """Every CHANGE_LOG_PRUNE_EVERY commits of this process, forget the changes of transactions
        older than the one of the CHANGE_LOG_KEEP-th newest change, than every transaction still
        running and than the first change made since `kept_since`; a process whose horizon is older
        than that loads everything again."""
        self.engine.commits += 1
        if self.engine.commits % CHANGE_LOG_PRUNE_EVERY == 0:
            self.conn.execute(
                "WITH cut AS (SELECT least(xid, pg_snapshot_xmin(pg_current_snapshot()), "
                "(SELECT kept.xid FROM changes kept WHERE kept.at >= %s ORDER BY kept.seq LIMIT 1)) AS xid "
                "FROM changes ORDER BY seq DESC OFFSET %s LIMIT 1), "
                "gone AS (DELETE FROM changes WHERE xid < (SELECT xid FROM cut)), "
                "ticks AS (DELETE FROM commits WHERE xid < (SELECT xid FROM cut) RETURNING tick) "
                "UPDATE change_log_start SET below = greatest(below, (SELECT xid FROM cut)), "
                "below_tick = greatest(below_tick, (SELECT max(tick) FROM ticks)) "
                "WHERE EXISTS (SELECT 1 FROM cut)", (kept_since, CHANGE_LOG_KEEP))

    def stamp(self, who, request_id, position):
        """Write who made the changes this transaction logged since the last stamp (one write's), in
        which request."""
        self.conn.execute("UPDATE changes SET who = %s, request_id = %s WHERE xid = pg_current_xact_id() "
                          "AND who IS NULL", (who, request_id))


def postgres_place(url):
    """Where a PostgreSQL URL points, for messages: never its password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        return "PostgreSQL (a URL that cannot be read)"
    host = params.get("host") or "the default host (PGHOST, else the local socket)"
    port = f":{params['port']}" if params.get("port") else ""
    return f"PostgreSQL database {params.get('dbname') or params.get('user') or '(default)'!r} on {host}{port}"


class PostgresEngine:
    """A PostgreSQL database shared by any number of processes on any number of machines, and a pool
    of connections to it (`pool_size`, about the threads that serve requests). Each connection has
    lock, statement and idle-in-transaction timeouts. Opening it connects once (a ConfigError naming
    the host and database if it cannot), takes the schema's steps it lacks under an advisory lock
    (every process starting at once waits for the first), and refuses a database of another
    application or of a newer version of the service.

    While the database does not answer, reads are answered from the fleet and writes get 503; a
    connection found broken sends its pool to check the others (and the write runs again on
    another); from then until a connection is lent again, a request waits for the pool only
    POSTGRES_FAILING_WAIT seconds, and for POSTGRES_DOWN_PAUSE seconds after the pool could not lend
    one, requests for one fail at once."""
    Error = psycopg.Error
    read_cursor = staticmethod(PostgresConnection.read_cursor)
    shared = True
    identity = None  # positions differ between processes holding the same data: the fleet's own version names it

    def __init__(self, url, pool_size=8, busy_timeout=5.0):
        self.url, self.name, self.busy_timeout = url, postgres_place(url), busy_timeout
        self.commits, self.down_until, self.failing = 0, 0.0, False
        try:
            with psycopg.connect(url, autocommit=True, connect_timeout=max(1, round(busy_timeout))) as conn:
                self._configure(conn)
                self._upgrade(conn)
        except psycopg.Error as error:
            raise ConfigError(f"DEALERSHIP_DATABASE: cannot use the {self.name}: "
                              f"{str(error).strip().splitlines()[0]}") from None
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                                   kwargs={"autocommit": True}, configure=self._configure,
                                   timeout=busy_timeout, name="dealership")
        self.pool.open()

    def _configure(self, conn):
        """Every new connection: times in UTC, and how long it may wait or run."""
        conn.execute(f"SET TIME ZONE 'UTC'; SET lock_timeout = '{self.busy_timeout * 1000:.0f}ms'; "
                     f"SET statement_timeout = '{POSTGRES_STATEMENT_TIMEOUT}s'; "
                     f"SET idle_in_transaction_session_timeout = '{POSTGRES_IDLE_IN_TRANSACTION}s'")

    def _upgrade(self, conn):
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (APPLICATION_ID,))
            ours = conn.execute("SELECT to_regclass('dealership_schema') IS NOT NULL").fetchone()[0]
            if ours:
                version = conn.execute("SELECT version FROM dealership_schema").fetchone()[0]
            elif conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()").fetchone()[0]:
                raise ConfigError(f"DEALERSHIP_DATABASE: the {self.name} has tables of another application: "
                                  "point the setting at a database of the service's own, or an empty one.")
            else:
                version = 0
                conn.execute("CREATE TABLE dealership_schema (version integer NOT NULL)")
                conn.execute("INSERT INTO dealership_schema VALUES (0)")
            if version > POSTGRES_SCHEMA_VERSION:
                raise ConfigError(f"DEALERSHIP_DATABASE: the {self.name} was written by a newer version of the "
                                  f"service (schema {version}; this one knows up to {POSTGRES_SCHEMA_VERSION}): "
                                  "run that version.")
            for step in POSTGRES_SCHEMA_STEPS[version:]:
                conn.execute(step.sql)
                if step.fill is not None:
                    step.fill(conn)
            if version == 0:
                PostgresConnection(conn, self).insert("dealer", SEED_DEALER)
            conn.execute("UPDATE dealership_schema SET version = %s", (POSTGRES_SCHEMA_VERSION,))
        if version == 0:
            log.info("%s: new database, schema version %d", self.name, POSTGRES_SCHEMA_VERSION)
        elif version < POSTGRES_SCHEMA_VERSION:
            log.info("%s: schema upgraded from version %d to %d", self.name, version, POSTGRES_SCHEMA_VERSION)

    @contextmanager
    def _connection(self, wait=None):
        """A connection from the pool, waiting for one up to `wait` seconds (else the busy timeout; a
        shorter wait that runs out only says the pool was busy, not that the database is down)."""
        if time.monotonic() < self.down_until:
            raise PoolTimeout(f"the {self.name} did not answer a moment ago")
        try:  # while the database is failing, a read is answered from the fleet and a write refused at once
            with self.pool.connection(timeout=POSTGRES_FAILING_WAIT if self.failing else wait) as conn:
                self.failing = False
                yield PostgresConnection(conn, self)
        except PoolTimeout:  # no connection could be had
            if wait is not None and not self.failing:
                raise
            self.failing, self.down_until = True, time.monotonic() + POSTGRES_DOWN_PAUSE
            self.pool.check()  # and the pool tries to connect again now, if it has no connection left
            raise
        except psycopg.OperationalError as error:
            if connection_lost(error):
                self.failing = True
                self.pool.check()  # the others may be broken too: replace them before they are lent
            raise

    def writer(self):
        """A connection from the pool, for one batch of writes."""
        return self._connection()

    def reader(self):
        """A connection from the pool, to see whether another process has committed and to catch up."""
        return self._connection()

    @staticmethod
    def combine(position, other):
        return position.combine(other)

    @staticmethod
    def retryable(error):
        """A deadlock, a serialization failure, or a clash only the constraint saw (a writer the fleet
        had not caught up with): run the transaction again. So is a connection lost before COMMIT,
        never one lost during it."""
        return error.sqlstate in POSTGRES_RETRY or \
            (connection_lost(error) and not isinstance(error, (OutcomeUnknown, PoolTimeout)))

    def client_error(self, error):
        """What a client is told when PostgreSQL refuses a write: a 409 for a constraint, else a 503
        (nothing changed, try again later), or that the outcome is unknown."""
        if isinstance(error, OutcomeUnknown):
            return StorageUnavailable("The connection to the database was lost while it committed the change: it "
                                      "may or may not have been made. Read it back before trying again.", 5)
        if isinstance(error, psycopg.errors.IntegrityError):
            return ConflictError("The change conflicts with the stored data (another process changed it at the "
                                 "same moment); nothing was changed.")
        if error.sqlstate in ("55P03", "57014"):
            detail, retry = ("The database is busy: another process held what this change needs for longer "
                             "than DEALERSHIP_BUSY_TIMEOUT. Nothing was changed; try again."), 1
        elif connection_lost(error):
            detail, retry = (f"The database does not answer ({str(error).strip().splitlines()[0]}). Nothing was "
                             "changed; reads are answered as before."), 5
        else:
            detail, retry = f"The database refused the change ({error.sqlstate}); nothing was changed.", 10
        return StorageUnavailable(detail, retry)

    def ping(self):
        """A trivial read, and the pool's state. It waits for a connection at most POSTGRES_HEALTH_WAIT:
        a probe begun as the database stops is answered 503 then, not after the busy timeout."""
        with self._connection(wait=POSTGRES_HEALTH_WAIT) as db:
            db.ping()
        stats = self.pool.get_stats()
        return {"pool": {"size": stats.get("pool_size", 0), "idle": stats.get("pool_available", 0),
                         "max": self.pool.max_size, "waiting": stats.get("requests_waiting", 0)}}

    def backup(self, target):
        params = conninfo_to_dict(self.url)
        password = " (its password from PGPASSWORD or ~/.pgpass)" if params.pop("password", None) else ""
        url = make_conninfo(**params)
        raise click.ClickException(
            f"The {self.name} is backed up with PostgreSQL's own tool{password}, while the service runs:\n"
            f"  pg_dump --format=custom --file={shlex.quote(target)} {shlex.quote(url)}\n"
            f"and restored into an empty database with pg_restore --dbname=URL {shlex.quote(target)}.")

    def close(self):
        self.pool.close()


def open_engine(name, config, create=True):
    """The engine on `name`: a PostgreSQL URL, ":memory:" or the path of a SQLite file (which it
    makes unless `create` is False), with the settings of `config` (see SETTINGS)."""
    if name.startswith(POSTGRES_SCHEMES):
        return PostgresEngine(name, config["DEALERSHIP_POOL_SIZE"], config["DEALERSHIP_BUSY_TIMEOUT"])
    return SQLiteEngine(name, config["DEALERSHIP_SYNCHRONOUS"], config["DEALERSHIP_BUSY_TIMEOUT"], create=create,
                        accept_wal_loss=config["DEALERSHIP_ACCEPT_WAL_LOSS"])

# ---------------------------------------------------------------------------------------------
# The write queue: group commit. Writes that arrive while one is under way wait, and the next
# thread to run takes as many as can share one transaction.
# ---------------------------------------------------------------------------------------------


class Job:
    """A write waiting for its turn: the change to make, the cars it reads and changes (None: it may
    read anything, so it runs alone), and once done its result or error and what the fleet must do
    after COMMIT. `turn`, an Event for a write that waits, is set when it is done or when its
    thread is to run the next batch."""
    __slots__ = ("change", "cars", "locks", "result", "error", "done", "turn", "after_commit", "writer")

    def __init__(self, change, cars, locks):
        self.change, self.cars, self.result, self.error, self.done, self.turn = change, cars, None, None, False, None
        self.locks, self.after_commit = locks, []
        self.writer = WRITER.get()  # who makes it, in which request: written beside its changes

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class WriteQueue:
    """Runs each write given to `submit` through `commit(batch)`, a batch at a time: the first write
    alone if it names no cars, else every write in turn that reads and changes only cars no other
    write of the batch touches (at most MAX_BATCH). A thread whose write is queued waits; the
    thread of the first write still queued runs the next batch."""

    def __init__(self, commit):
        self.commit = commit
        self.lock, self.jobs, self.leading = threading.Lock(), [], False

    def submit(self, change, cars=None, locks=None):
        """`locks`: the rows ((kind, id) pairs) the transaction locks before it catches up and checks
        (by default those of `cars`): every write names the records it changes, so that writers of
        other processes wait for each other there."""
        job = Job(change, cars, locks if locks is not None else {("car", car) for car in cars or ()})
        with self.lock:
            lead, self.leading = not self.leading, True
            if not lead:
                job.turn = threading.Event()  # only a write that waits needs one
            self.jobs.append(job)
        if not lead:
            job.turn.wait()  # done, or this thread's turn to run the next batch
            if job.done:
                return job.outcome()
        try:
            while not job.done:
                with self.lock:
                    batch = self._next_batch()
                try:
                    self.commit(batch)
                finally:
                    for other in batch:
                        if not other.done:  # commit itself failed: never leave a caller waiting
                            other.error, other.done = RuntimeError("The write was interrupted."), True
                        if other is not job:
                            other.turn.set()
        finally:
            with self.lock:  # hand the queue on to the thread of its first write, if any
                if not job.done and job in self.jobs:  # a batch before it failed outright
                    self.jobs.remove(job)
                if self.jobs:
                    self.jobs[0].turn.set()
                else:
                    self.leading = False
        return job.outcome()

    def _next_batch(self):
        """Take from the queue (under its lock) the writes that can share one transaction."""
        batch, cars = [], set()
        for job in self.jobs:
            if job.cars is None:
                if not batch:
                    batch.append(job)
                break
            if len(batch) == MAX_BATCH or not cars.isdisjoint(job.cars):
                break
            batch.append(job)
            cars |= job.cars
        del self.jobs[:len(batch)]
        return batch


# ---------------------------------------------------------------------------------------------
# Metrics: what the service counts, for Prometheus (GET /metrics). Each store has its own registry;
# under serve with several workers each worker writes its figures to a folder that prometheus_client's
# multiprocess mode sums (see supervise). No label holds personal data or an unbounded value.
# ---------------------------------------------------------------------------------------------

SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"
BOOKING_ACTIONS = ("created", "changed", "cancelled")
RECORD_KINDS = ("dealers", "cars", "bookings", "maintenance_windows")


class Metrics:
    """Every metric the service keeps, in a registry of its own (two apps in one process share none)."""

    def __init__(self):
        self.registry = registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter(
            "dealership_http_requests", "Requests answered, by method, route template and status.",
            ["method", "route", "status"], registry=registry)
        self.duration = prometheus_client.Histogram(
            "dealership_http_request_duration_seconds", "Time to answer a request, by method and route template.",
            ["method", "route"], buckets=SECONDS_BUCKETS, registry=registry)
        self.bookings = prometheus_client.Counter(
            "dealership_bookings", "Bookings created, changed and cancelled through this service.", ["action"],
            registry=registry)
        self.refusals = prometheus_client.Counter(
            "dealership_refusals", "Requests refused, by the rule they broke or how they were turned away.",
            ["reason"], registry=registry)
        self.unavailable = prometheus_client.Counter(
            "dealership_storage_unavailable", "Requests answered 503 because the database could not be used.",
            registry=registry)
        self.batch_size = prometheus_client.Histogram(
            "dealership_write_batch_size", "Writes run together in one transaction that held (its count: the batches).",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.commit_duration = prometheus_client.Histogram(
            "dealership_commit_duration_seconds", "Write transactions that held, from BEGIN to the end of COMMIT "
            "(its sync to disk included).", buckets=SECONDS_BUCKETS, registry=registry)
        self.changes_applied = prometheus_client.Counter(
            "dealership_changes_applied", "Records read from the change log: what other processes changed.",
            registry=registry)
        self.caught_up = prometheus_client.Gauge(
            "dealership_caught_up_timestamp_seconds", "When the store last found it held every committed change "
            "(Unix time; checked on every request); with several workers, the one that looked longest ago.",
            registry=registry, multiprocess_mode="livemin")
        self.records = prometheus_client.Gauge(
            "dealership_records", "Records stored, by kind.", ["kind"], registry=registry,
            multiprocess_mode="livemostrecent")
        for action in BOOKING_ACTIONS:  # every series there is, from 0
            self.bookings.labels(action)
        for reason in REFUSAL_REASONS:
            self.refusals.labels(reason)
        self.series = {}  # (method, route, status) -> its request counter and duration histogram

    def request_series(self, method, route, status):
        """The counter and histogram of a kind of request, found once (labels() costs as much as the count)."""
        series = self.series.get((method, route, status))
        if series is None:
            series = self.series[method, route, status] = (self.requests.labels(method, route, str(status)),
                                                           self.duration.labels(method, route))
        return series


# ---------------------------------------------------------------------------------------------
# The store: the fleet every request reads, the engine under it and the write queue, tied
# together. Every write checks and writes in one transaction, and the fleet changes only after
# COMMIT. Readers never wait for the disk or for another process.
# ---------------------------------------------------------------------------------------------


class Rollback(Exception):
    """The one write of a transaction was refused: roll the transaction back."""


REFUSED_WRITE_LOG_EVERY = 10  # seconds: a full or read-only disk refuses every write, thousands a second
HOLD_KEPT = timedelta(days=1)  # how long an expired hold is kept (for its 410) before a new hold removes it
ANSWERS_PRUNE_EVERY = 500  # answers kept for Idempotency-Key between two prunings of the old ones


@dataclass
class KeyedWrite:
    """A write sent with an Idempotency-Key: the key, a fingerprint of the request, how long an answer
    is kept, and `answer`, which makes the response (status, headers, body) from the write's result
    in the request's own `context` (the write may run on another request's thread). Once made, the
    response is in `response`."""
    key: str
    fingerprint: str
    window: timedelta
    answer: object = None
    context: object = None
    response: object = None


IDEMPOTENCY_HEADER = "Idempotency-Key"
IDEMPOTENT = contextvars.ContextVar("dealership_idempotent", default=None)  # set around one keyed write


class Replayed(Exception):
    """The key of a write was used before, by the same request: `answer` is what it was answered."""

    def __init__(self, answer):
        super().__init__("answered before")
        self.answer = answer


def kept_answer(kept, keyed, now):
    """The answer to give again for `keyed`, from what the store kept with its key (see kept_answer of
    a connection): (status, headers, body), or None when there is none, or only one too old to count.
    The key used for another request is a 422."""
    if kept is None or kept[4] <= now - keyed.window:
        return None
    fingerprint, status, headers, body, _ = kept
    if not hmac.compare_digest(fingerprint, keyed.fingerprint):
        raise InvalidError("Idempotency-Key", "This key was used for another request (another method, path, body "
                                              "or API key): send a new key with each new request, and the same key "
                                              "only to retry the very same request.", "idempotency_key_reused")
    return status, json.loads(headers), body


class ThrottledLog:
    """A log line for an event that can come thousands of times a second: at most one every `every`
    seconds, the next one saying how many were left out since the last."""

    def __init__(self, every):
        self.every, self.lock, self.last, self.left_out = every, threading.Lock(), None, 0

    def log(self, level, message, *args):
        now = time.monotonic()
        with self.lock:
            if self.last is not None and now - self.last < self.every:
                self.left_out += 1
                return
            self.last, left_out, self.left_out = now, self.left_out, 0
        if left_out:
            message, args = message + " (and %d more since the last such line)", args + (left_out,)
        log.log(level, message, *args)


class Store:
    """Three locks: `lock` guards the fleet (every query takes it, and every change to it);
    `write_lock` lets one batch of writes of this process at a time use the engine's write
    connection; the write queue's own lock guards its queue. A write holds `lock` only to check and
    write its SQL, not while the database waits for another process or syncs the commit to disk.

    Each write is a function `change(db, job)` that checks against the fleet, writes through `db`,
    appends to `job.after_commit` what the fleet must do once the transaction holds (a Fleet method
    and its record), and returns its result; the write queue runs it (see _write). A change to one
    record may be given `expect`, a function of the record as stored that raises PreconditionFailed:
    it is called in the same step as the change's own checks."""

    def __init__(self, engine, zone=timezone.utc, metrics=None, history=timedelta(days=365)):
        self.engine, self.zone, self.metrics = engine, zone, metrics or Metrics()
        self.history_kept = history  # how long the change log keeps each change (see prune_change_log)
        self.keys_used, self.keys_checked = {}, time.monotonic()  # key id -> when noted used; see keys_made
        self.keys_known = {}  # key id -> its row as last read (see key_access)
        self.lock, self.write_lock = threading.Lock(), threading.Lock()
        self.queue = WriteQueue(self._commit)
        self.keys_lock, self.keys_in_flight, self.answers_kept = threading.Lock(), set(), 0
        self.refused_writes = ThrottledLog(REFUSED_WRITE_LOG_EVERY)
        self.unread = ThrottledLog(REFUSED_WRITE_LOG_EVERY)
        with engine.writer() as db, self.lock:
            self._reload(db)
            self.keys_seen = db.keys_made()

    # -- dealers --------------------------------------------------------------------------------

    def add_dealer(self, fields):
        def change(db, job):
            dealer = Dealer(id=db.insert("dealer", fields), **fields)
            job.after_commit.append((Fleet.put_dealer, dealer))
            return dealer
        dealer = self._write(change)
        log.info("dealer %d created", dealer.id, extra={"event": "dealer created", "dealer_id": dealer.id})
        return dealer

    def update_dealer(self, dealer_id, changes, expect=None):
        """A change of turnaround applies to bookings and windows made or moved from now on; the
        schedules as they stand stay valid."""
        def change(db, job):
            dealer = changed(self.checked(self.fleet.dealer(dealer_id), expect), **changes)
            db.update("dealer", dealer_id, {name: getattr(dealer, name) for name in DEALER_FIELDS})
            job.after_commit.append((Fleet.put_dealer, dealer))
            return dealer
        dealer = self._write(change, locks={("dealer", dealer_id)})
        log.info("dealer %d changed: %s", dealer_id, ", ".join(sorted(changes)) or "nothing",
                 extra={"event": "dealer changed", "dealer_id": dealer_id, "fields": sorted(changes)})
        return dealer

    def delete_dealer(self, dealer_id, expect=None):
        def change(db, job):
            self.checked(self.fleet.dealer(dealer_id), expect)
            self.fleet.check_dealer_removable(dealer_id)
            db.delete("dealer", dealer_id)
            job.after_commit.append((Fleet.drop_dealer, dealer_id))
        self._write(change, locks={("dealer", dealer_id)})
        log.info("dealer %d deleted", dealer_id, extra={"event": "dealer deleted", "dealer_id": dealer_id})

    # -- cars -----------------------------------------------------------------------------------

    def add_car(self, fields):
        def change(db, job):
            self.fleet.dealer(fields["dealer_id"])
            self.fleet.check_vin_free(fields["vin"])
            car = Car(id=db.insert("car", fields), **fields)
            job.after_commit.append((Fleet.put_car, car))
            return car
        car = self._write(change)
        log.info("car %d created: dealer %d, status %s", car.id, car.dealer_id, car.status,
                 extra={"event": "car created", "car_id": car.id, "dealer_id": car.dealer_id})
        return car

    def update_car(self, car_id, changes, expect=None, allow=None):
        """Bookings keep the price they were made at, and the turnaround they were checked with."""
        def change(db, job):
            old = self.checked(self.fleet.car(car_id), expect, allow)
            if "dealer_id" in changes:
                self.fleet.dealer(changes["dealer_id"])
            if changes.get("vin", old.vin) != old.vin:
                self.fleet.check_vin_free(changes["vin"])
            car = changed(old, **changes)
            db.update("car", car_id, {name: getattr(car, name) for name in CAR_FIELDS})
            job.after_commit.append((Fleet.put_car, car))
            return car
        car = self._write(change, locks={("car", car_id)})
        log.info("car %d changed: %s", car_id, ", ".join(sorted(changes)) or "nothing",
                 extra={"event": "car changed", "car_id": car_id, "fields": sorted(changes)})
        return car

    def delete_car(self, car_id, expect=None, allow=None):
        """Only a car with no bookings and no hold; its maintenance windows (and expired holds) go with it."""
        def change(db, job):
            self.checked(self.fleet.car(car_id), expect, allow)
            self.fleet.check_car_removable(car_id)
            for window in self.fleet.schedules[car_id].windows():
                db.delete("window", window.id)
            for hold in [hold for hold in self.fleet.holds.values() if hold.car_id == car_id]:
                db.delete("hold", hold.id)
                job.after_commit.append((Fleet.drop_hold, hold.id))
            db.delete("car", car_id)
            job.after_commit.append((Fleet.drop_car, car_id))
        self._write(change, locks={("car", car_id)})
        log.info("car %d deleted", car_id, extra={"event": "car deleted", "car_id": car_id})

    # -- bookings -------------------------------------------------------------------------------

    def add_booking(self, fields, allow=None):
        """A new booking reads and changes one car's schedule only: others like it, on other cars,
        share its transaction and its COMMIT."""
        check_not_past(fields["start_datetime"], datetime.now(timezone.utc), self.zone)

        def change(db, job):
            start, end = fields["start_datetime"], fields["end_datetime"]
            self.checked(self.fleet.car(fields["car_id"]), None, allow)
            car = self.fleet.bookable_car(fields["car_id"], start, end)
            row = fields | {"total_cents": price_cents(car.daily_price, start, end)}
            booking = Booking(id=db.insert("booking", row), **row)
            job.after_commit.append((Fleet.put_booking, booking))
            return booking
        booking = self._write(change, cars={fields["car_id"]})
        self._log_booking("created", booking)
        return booking

    def change_booking(self, booking_id, changes, expect=None, allow=None):
        """Apply `changes` to a booking that has not ended, in one step, checked against the rest of the
        car's schedule. A move, or a change of car, prices the booking again at the car's price of today."""
        def change(db, job):
            old, now = self.checked(self.fleet.booking(booking_id), expect, allow), datetime.now(timezone.utc)
            if changes.get("car_id", old.car_id) != old.car_id:
                self.checked(self.fleet.car(changes["car_id"]), None, allow)
            check_not_ended(old, now, self.zone)
            booking = changed(old, **changes)
            check_period(booking.start_datetime, booking.end_datetime)
            if booking.start_datetime != old.start_datetime:  # a running booking may still change its end
                check_not_past(booking.start_datetime, now, self.zone)
            if (booking.car_id, booking.start_datetime, booking.end_datetime) != \
                    (old.car_id, old.start_datetime, old.end_datetime):
                car = self.fleet.bookable_car(booking.car_id, booking.start_datetime, booking.end_datetime, ignore=old)
                booking = replace(booking, total_cents=price_cents(car.daily_price, booking.start_datetime,
                                                                   booking.end_datetime))
            db.update("booking", booking_id, {name: getattr(booking, name) for name in BOOKING_FIELDS})
            job.after_commit.append((Fleet.put_booking, booking))
            return booking
        booking = self._write(change, locks=self._cars_of(booking_id, changes))
        self._log_booking("changed", booking)
        return booking

    def _cars_of(self, booking_id, changes):
        """The rows of the cars a change of a booking writes to, as the fleet knows it now: its own,
        and the one it moves to."""
        booking = self.fleet.bookings.get(booking_id)
        return {("car", booking.car_id), ("car", changes.get("car_id", booking.car_id))} if booking else set()

    def cancel_booking(self, booking_id, expect=None, allow=None):
        def change(db, job):
            booking = self.checked(self.fleet.booking(booking_id), expect, allow)
            db.delete("booking", booking_id)
            job.after_commit.append((Fleet.drop_booking, booking_id))
            return booking
        self._log_booking("cancelled", self._write(change, locks=self._cars_of(booking_id, {})))

    def _log_booking(self, what, booking):
        self.metrics.bookings.labels(what).inc()
        # ids and times only: never the customer's name or e-mail
        start, end = format_instant(booking.start_datetime, self.zone), format_instant(booking.end_datetime, self.zone)
        log.info("booking %d %s: car %d, %s to %s", booking.id, what, booking.car_id, start, end,
                 extra={"event": f"booking {what}", "booking_id": booking.id, "car_id": booking.car_id,
                        "start_datetime": start, "end_datetime": end})

    # -- maintenance windows --------------------------------------------------------------------

    def add_window(self, car_id, fields, allow=None):
        """A maintenance window on a car: it may not overlap, nor come within the turnaround of, a
        booking or another window."""
        check_not_past(fields["start_datetime"], datetime.now(timezone.utc), self.zone, "maintenance window")

        def change(db, job):
            self.checked(self.fleet.car(car_id), None, allow)
            self.fleet.check_window_fits(car_id, fields["start_datetime"], fields["end_datetime"])
            row = fields | {"car_id": car_id}
            window = MaintenanceWindow(id=db.insert("window", row), **row)
            job.after_commit.append((Fleet.put_window, window))
            return window
        window = self._write(change, locks={("car", car_id)})
        start, end = format_instant(window.start_datetime, self.zone), format_instant(window.end_datetime, self.zone)
        log.info("maintenance window %d created: car %d, %s to %s", window.id, car_id, start, end,
                 extra={"event": "maintenance window created", "window_id": window.id, "car_id": car_id,
                        "start_datetime": start, "end_datetime": end})
        return window

    def delete_window(self, car_id, window_id, expect=None, allow=None):
        def change(db, job):
            self.checked(self.fleet.window(car_id, window_id), expect, allow)
            db.delete("window", window_id)
            job.after_commit.append((Fleet.drop_window, window_id))
        self._write(change, locks={("car", car_id)})
        log.info("maintenance window %d deleted: car %d", window_id, car_id,
                 extra={"event": "maintenance window deleted", "window_id": window_id, "car_id": car_id})

    # -- holds ----------------------------------------------------------------------------------

    def add_hold(self, fields, minutes, allow=None):
        """Hold a car's period for `minutes`, checked as a booking is. Holds that expired more than
        HOLD_KEPT ago are removed in the same transaction: no background job is needed."""
        check_not_past(fields["start_datetime"], datetime.now(timezone.utc), self.zone)

        def change(db, job):
            now = datetime.now(timezone.utc)
            self.checked(self.fleet.car(fields["car_id"]), None, allow)
            self.fleet.bookable_car(fields["car_id"], fields["start_datetime"], fields["end_datetime"])
            for hold_id in self.fleet.stale_holds(now - HOLD_KEPT):
                db.delete("hold", hold_id)
                job.after_commit.append((Fleet.drop_hold, hold_id))
            row = fields | {"expires_at": now + timedelta(minutes=minutes)}
            hold = Hold(id=db.insert("hold", row), **row)
            job.after_commit.append((Fleet.put_hold, hold))
            return hold
        hold = self._write(change, cars={fields["car_id"]})
        log.info("hold %d created: car %d until %s", hold.id, hold.car_id, format_instant(hold.expires_at, self.zone),
                 extra={"event": "hold created", "hold_id": hold.id, "car_id": hold.car_id})
        return hold

    def confirm_hold(self, hold_id, customer, allow=None):
        """Turn a hold that has not expired into a booking of its car and period, in one step: the hold
        is gone and the booking made (by the key that made the hold), or (expired: 410; the car no
        longer bookable: 409) neither."""
        def change(db, job):
            hold = self.checked(self.fleet.hold(hold_id, datetime.now(timezone.utc)), None, allow)
            start, end = hold.start_datetime, hold.end_datetime
            car = self.fleet.bookable_car(hold.car_id, start, end, ignore=hold)
            db.delete("hold", hold_id)
            row = customer | {"car_id": hold.car_id, "start_datetime": start, "end_datetime": end,
                              "total_cents": price_cents(car.daily_price, start, end), "made_by": hold.made_by}
            booking = Booking(id=db.insert("booking", row), **row)
            job.after_commit += [(Fleet.drop_hold, hold_id), (Fleet.put_booking, booking)]
            return booking
        hold = self.fleet.holds.get(hold_id)
        booking = self._write(change, cars={hold.car_id} if hold else None)
        self._log_booking("created", booking)
        return booking

    def delete_hold(self, hold_id, allow=None):
        def change(db, job):
            self.checked(self.fleet.hold(hold_id, datetime.now(timezone.utc)), None, allow)
            db.delete("hold", hold_id)
            job.after_commit.append((Fleet.drop_hold, hold_id))
        hold = self.fleet.holds.get(hold_id)
        self._write(change, cars={hold.car_id} if hold else None)
        log.info("hold %d deleted", hold_id, extra={"event": "hold deleted", "hold_id": hold_id})

    # -- what every write shares -----------------------------------------------------------------

    def checked(self, record, expect, allow=None):
        """`record`, once `allow` (the key's permission: a function of the record and the fleet) and
        then `expect` (If-Match), each if given, have passed it."""
        if allow is not None:
            allow(record, self.fleet)
        if expect is not None:
            expect(record)
        return record

    def _write(self, change, cars=None, locks=None):
        """Run `change` through the write queue. Sent with an Idempotency-Key (IDEMPOTENT), the
        write first looks for the answer kept with its key and, if there is one, gives it again
        (Replayed) with nothing changed; otherwise it keeps its own answer with the key, in the
        same transaction as the change."""
        keyed = IDEMPOTENT.get()
        if keyed is not None:
            change = self._keyed(change, keyed)
        return self.queue.submit(change, cars, locks)

    def _keyed(self, change, keyed):
        def keyed_change(db, job):
            db.lock_key(keyed.key)  # another process's write under the same key: once it has ended
            now = datetime.now(timezone.utc)
            answer = kept_answer(db.kept_answer(keyed.key), keyed, now)
            if answer is not None:
                raise Replayed(answer)
            result = change(db, job)
            keyed.response = keyed.context.run(keyed.answer, result)
            status, headers, body = keyed.response
            db.keep_answer(keyed.key, keyed.fingerprint, status, json.dumps(headers), body, now)
            self.answers_kept += 1
            if self.answers_kept % ANSWERS_PRUNE_EVERY == 0:
                db.forget_answers(now - keyed.window)
            return result
        return keyed_change

    def kept_answer(self, keyed):
        """The answer to give again for `keyed`, read outside any write (see kept_answer)."""
        try:
            with self.engine.reader() as db:
                kept = db.kept_answer(keyed.key)
        except self.engine.Error as error:
            raise StorageUnavailable(f"The database cannot be read to look up the {IDEMPOTENCY_HEADER} ({error}); "
                                     "nothing was changed: retry with the same key.", 5) from None
        return kept_answer(kept, keyed, datetime.now(timezone.utc))

    @contextmanager
    def key_in_flight(self, key):
        """While a request with `key` runs in this process, another with the same key is a 409."""
        with self.keys_lock:
            if key in self.keys_in_flight:
                raise ConflictError("A request with this Idempotency-Key is still being handled: wait for its "
                                    "answer, or retry in a moment to get that answer again.")
            self.keys_in_flight.add(key)
        try:
            yield
        finally:
            with self.keys_lock:
                self.keys_in_flight.discard(key)

    # -- keys and the history: read from the database on each use, so every process sees a new
    # -- or revoked key at once -------------------------------------------------------------------

    def make_key(self, role, dealer_id, note):
        """A new key: its id and the key to send ("<id>.<secret>"), given only here."""
        secret = new_key()

        def change(db, job):
            if dealer_id is not None:
                self.fleet.dealer(dealer_id)
            return db.add_key(role, dealer_id, note, key_hash(secret), datetime.now(timezone.utc))
        key_id = self._write(change)
        self.keys_seen = True
        return key_id, f"{key_id}.{secret}"

    def list_keys(self):
        with self.engine.reader() as db:
            return db.api_keys()

    def revoke_key(self, key_id):
        """Revoke a key: False if there is none with that id, or it was revoked already."""
        return self._write(lambda db, job: db.revoke_key(key_id, datetime.now(timezone.utc)))

    def key_access(self, key):
        """The Access of a key sent as "<id>.<secret>", if it is one that has not been revoked (the
        hash compared in constant time), else None. Notes when it was last used, once a minute."""
        key_id, dot, secret = key.partition(".")
        if not KEY_ID.fullmatch(key_id) or not secret:  # one spelling of each id: the key is who it says
            return None
        read = True
        try:
            with self.engine.reader() as db:
                found = db.api_key(int(key_id))
        except self.engine.Error as error:
            # reads go on from memory while the database cannot be read, and so do the keys this
            # process has read before, as they then stood (a revocation needs the database too)
            if key_id not in self.keys_known:
                raise StorageUnavailable(f"The database cannot be read to check the API key ({error}): try "
                                         "again.", 5) from None
            found, read = self.keys_known[key_id], False
        if found is None:
            return None
        self.keys_seen, self.keys_known[key_id] = True, found  # a key was made: keys are in force
        if not hmac.compare_digest(found[2], key_hash(secret)) or found[3]:
            return None
        now = datetime.now(timezone.utc)
        if read and now - self.keys_used.get(key_id, EPOCH) >= KEY_USE_EVERY:
            self.keys_used[key_id] = now
            try:  # a note, not a write the client waits on: skipped if the database refuses it
                self.queue.submit(lambda db, job: db.key_used(int(key_id), now), set())
            except (DomainError, StorageUnavailable):
                pass
        return Access(key_id, found[0], found[1])

    def keys_made(self):
        """Whether any key was ever made (then every write and personal read needs a key): known once
        it is so; until then read again at most every KEYS_CHECK_EVERY, when other processes share
        the database (a `keys add` beside a running service)."""
        now = time.monotonic()
        if not self.keys_seen and self.engine.shared and now - self.keys_checked >= KEYS_CHECK_EVERY:
            self.keys_checked = now
            try:
                with self.engine.reader() as db:
                    self.keys_seen = db.keys_made()
            except self.engine.Error as error:  # as it last stood: reads go on from memory meanwhile
                self.unread.log(logging.WARNING, "could not read %s to look for API keys: %s", self.engine.name, error)
        return self.keys_seen

    def history(self, kind, record_id):
        """A record's changes that the change log keeps, oldest first (see RecordRows.history)."""
        if record_id >= ID_SPAN:  # no record has such an id
            return []
        try:
            with self.engine.reader() as db:
                return db.history(kind, record_id)
        except self.engine.Error as error:
            raise StorageUnavailable(f"The database cannot be read for the history ({error}): try again.", 5) \
                from None

    # -- the change feed --------------------------------------------------------------------------

    def changes(self, after, limit):
        """The change feed: see the engines' feed(); for a cursor not within the log, a GoneError
        with the cursor to follow on from (`next`) once the collections are read again."""
        try:
            with self.engine.reader() as db:
                page, cursor = db.feed(after, limit)
        except self.engine.Error as error:
            raise StorageUnavailable(f"The database cannot be read for the change feed ({error}): try again.", 5) \
                from None
        if page is None:
            error = GoneError("The cursor is not within the change log: older than the oldest change it keeps (the "
                              "changes after it are lost to it), or not of this database. Read the collections again, "
                              "then follow the feed from this answer's cursor `next`.")
            error.next = cursor
            raise error
        return page, cursor

    # -- queries: under the lock, so a reader never sees a schedule mid-change -------------------

    def read(self, query, *args, **kwargs):
        """`query(fleet, *args, **kwargs)` under the lock, holds that have expired gone: a Fleet
        method, or any function of the fleet."""
        with self.lock:
            self.fleet.expire()
            return query(self.fleet, *args, **kwargs)

    # -- keeping up with the database -------------------------------------------------------------

    def sync(self):
        """Bring the fleet up to date if another process (or app) committed since this one looked.

        Called before every request, through a read connection of this thread's own, so that the
        usual answer ("nothing new") needs no lock. If the database cannot be read, the request is
        answered from the fleet as it is; a write catches up (or fails with 503) inside its own
        transaction."""
        for attempt in (1, 2):
            try:
                self.refresh()
                return
            except self.engine.Error as error:
                if attempt == 1 and self.engine.retryable(error):  # a connection found broken: once more, on
                    continue  # another (after a restart of PostgreSQL, the pool's others are checked meanwhile)
                self.unread.log(logging.WARNING, "could not read %s to catch up: %s", self.engine.name, error)

    def refresh(self):
        """sync, raising engine.Error when the database cannot be read."""
        if self.engine.shared:
            with self.engine.reader() as db:
                if db.news(self.position):
                    with self.lock:
                        self._catch_up(db)
        self.metrics.caught_up.set(time.time())

    def count_records(self):
        """Set the gauges of records stored, from the fleet as it stands."""
        with self.lock:
            fleet = self.fleet
            counts = len(fleet.dealers), len(fleet.cars), len(fleet.bookings), len(fleet.windows)
        for kind, count in zip(RECORD_KINDS, counts):
            self.metrics.records.labels(kind).set(count)

    def data_version(self):
        """What names the data as it stands. On a file, the same in every process that serves it:
        the file's identity and the change log's position (all that is committed up to it is in the
        fleet); otherwise this fleet's own name and count of changes."""
        with self.lock:
            self.fleet.expire()
            if self.engine.identity is not None:  # and the holds of that data that have expired by now
                return self.engine.identity, self.position, self.fleet.expired
            return self.fleet.origin, self.fleet.version

    def ping(self):
        """A trivial read of the database, and what the engine tells of its state (a dict); raises
        engine.Error when the database does not answer."""
        return self.engine.ping()

    def _commit(self, batch):
        """One transaction for the writes of `batch`: the locks of the cars they write to, what other
        processes committed, each write's checks and SQL (under its own savepoint when it shares the
        transaction, so that a refusal undoes only its own statements), COMMIT, one sync to disk for
        all; only then does the fleet change, in the order the writes ran. A refusal goes to its own
        caller only; a database error to every caller of the batch, and then nothing of it is kept.
        A transaction the database broke off to keep writers of other processes apart (a deadlock,
        a serialization failure, a clash only its constraint saw) runs again, up to WRITE_ATTEMPTS
        times, each time caught up afresh."""
        shared = len(batch) > 1
        rows = {row for job in batch for row in job.locks}
        with self.write_lock:
            for attempt in range(1, WRITE_ATTEMPTS + 1):
                for job in batch:
                    job.result, job.error, job.after_commit = None, None, []
                try:
                    began = time.perf_counter()
                    with self.engine.writer() as writer, writer.transaction(write=True) as db:
                        db.lock(rows)
                        if self.engine.shared:
                            with self.lock:
                                self._catch_up(db)
                        position = self._run_each(db, batch, shared, last=attempt == WRITE_ATTEMPTS)
                        db.prune_change_log(self.position, position, datetime.now(timezone.utc) - self.history_kept)
                except Rollback:
                    pass
                except (StaleRecord, self.engine.Error) as error:  # BEGIN, catching up, a statement or COMMIT:
                    stale = isinstance(error, StaleRecord)  # nothing was kept
                    if attempt < WRITE_ATTEMPTS and (stale or self.engine.retryable(error)):
                        time.sleep(random.uniform(0.001, 0.02) * attempt)  # apart from the other writer
                        self.sync()  # through a snapshot of its own, which may load everything again
                        continue
                    self.refused_writes.log(logging.ERROR, "write refused by %s: %s", self.engine.name, error)
                    failure = StaleRecord.conflict() if stale else self.engine.client_error(error)
                    for job in batch:
                        if job.error is None:
                            job.error = failure
                else:
                    self.metrics.commit_duration.observe(time.perf_counter() - began)
                    self.metrics.batch_size.observe(len(batch))
                    with self.lock:
                        if self.engine.combine(self.position, position) != self.position:
                            for job in batch:  # unless a reader has caught up with it already
                                for change, record in job.after_commit:
                                    change(self.fleet, record)
                            self.position = self.engine.combine(self.position, position)
                break
        for job in batch:
            job.done = True

    def _run_each(self, db, batch, shared, last):
        """Each write of the batch, inside the transaction; the change log's position after them."""
        position = self.position  # caught up: what this transaction writes comes after it
        for job in batch:
            db.written = 0
            try:
                with db.savepoint() if shared else nullcontext(), self.lock:
                    self.fleet.expire()
                    job.result = job.change(db, job)
                    if db.written and job.writer is not None:
                        db.stamp(*job.writer, position)
            except StaleRecord:
                if not last:
                    raise
                job.error = StaleRecord.conflict()
            except self.engine.Error as error:
                failure = self.engine.client_error(error)
                if not isinstance(failure, ConflictError) or (not last and self.engine.retryable(error)):
                    raise  # the database itself, or a transaction to run again: the whole batch
                self.refused_writes.log(logging.ERROR, "write refused by %s: %s", self.engine.name, error)
                job.error = failure
            except Exception as error:  # a refusal (or a bug): this write's caller gets it
                job.error = error
            if job.error is None:
                position = db.after_writes(position)
            elif not shared:
                raise Rollback  # its statements undone with the transaction
        return position

    def _catch_up(self, db):
        """Apply the changes logged since this process last looked, read through `db` (under the lock)."""
        if not db.news(self.position):  # nobody else has committed since the fleet was caught up
            return
        changes = db.changes_since(self.position)
        if changes is None:  # pruned past what this process has seen: start afresh
            log.info("%s: more changed than the change log keeps; loading everything again", self.engine.name)
            self._reload(db)
            return
        changed, position = changes
        self.fleet.apply(changed)
        self.position = position
        self.metrics.changes_applied.inc(sum(map(len, changed.values())))

    def _reload(self, db):
        """A new fleet from every record (under the lock), swapped in whole: a lookup that takes no
        lock never sees a dict half filled."""
        records, position = db.load()
        self.fleet, self.position = Fleet(self.zone, **records), position


# ---------------------------------------------------------------------------------------------
# Schemas: the one definition of every field, for input and output
# ---------------------------------------------------------------------------------------------


to_json = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps() with options makes one per call


@dataclass(frozen=True)
class Presentation:
    """How the service reads naive date-times and writes instants and prices: the dealership's zone
    and currency. Each app sets its own for the request it handles (see init_app); outside a
    request, schemas use UTC and euros. `tag`: what they add to a record's ETag."""
    zone: object = timezone.utc
    currency: str = "EUR"
    tag: str = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        key = repr((str(self.zone), self.currency)).encode()
        object.__setattr__(self, "tag", hashlib.blake2b(key, digest_size=4).hexdigest())


PRESENTATION = contextvars.ContextVar("dealership_presentation", default=Presentation())


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
        if not self.regex.search(value) or LONE_SURROGATE.search(value) or INVISIBLE_ONLY.fullmatch(value):
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


@functools.lru_cache(maxsize=10_000)
def normalized_email(address):
    """email-validator's normal form of an address, or EmailNotValidError. A pure function that takes
    some 20 us a call, so the addresses seen last (customers come back) are remembered."""
    return email_validator.validate_email(address, check_deliverability=False).normalized


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
        if self.in_query and " " in value:
            value = self.PLUS_AS_SPACE.sub(r"\1+\2", value)
        form = self.FORM.fullmatch(value)
        try:
            moment = datetime.fromisoformat(f"{form[1]}T{form[2]}{(form[3] or '').upper()}")
        except (TypeError, ValueError):  # no match, or a day or hour that does not exist
            raise self.make_error("invalid") from None
        zone = PRESENTATION.get().zone
        try:
            if moment.tzinfo is None:
                local, moment = moment, moment.replace(tzinfo=zone)
                if moment.astimezone(timezone.utc).astimezone(zone).replace(tzinfo=None) != local:
                    raise self.make_error("gap", input=value, zone=zone)
            if not 2 < moment.year < 9998:  # only within a day of the calendar's ends can writing it fail
                format_instant(moment, zone)  # the output must be writable in the store's zone too
            return moment.astimezone(timezone.utc)
        except OverflowError:
            raise self.make_error("range") from None

    def _validate(self, value):
        if self.validators:  # marshmallow makes a combined validator on every call, even of none
            super()._validate(value)

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else format_instant(value, PRESENTATION.get().zone)


class Money(fields.Float):
    """A price held in whole cents, written as a JSON number of the currency (12990 -> 129.9)."""

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else value / 100


class Currency(fields.String):
    """The service's currency (DEALERSHIP_CURRENCY), written beside a price."""

    def serialize(self, attr, obj, accessor=None, **kwargs):
        return PRESENTATION.get().currency


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


def about(description, example=None):
    """A field's metadata for the OpenAPI document: its rule in words, and an example that is valid
    as it is (date-times get theirs when the document is made: a week ahead of today)."""
    return {"description": description} | ({} if example is None else {"example": example})


STRIPPED = "surrounding spaces are removed"


class EndAfterStart:
    """For a schema with start_datetime and end_datetime: the end must be after the start."""

    @validates_schema
    def end_after_start(self, data, **kwargs):
        try:
            check_period(data.get("start_datetime"), data.get("end_datetime"))
        except InvalidError as error:
            raise ValidationError(str(error), field_name=error.field) from None


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


START = ("When the booking starts: an RFC 3339 date-time with an offset (2030-06-01T09:00:00+02:00), "
         "or without one for the dealership's time zone; not in the past.")
END = ("When it ends, after the start. The booking holds [start, end): at this very instant the car "
       "is free again.")


def customer_name_field():
    """The customer's name field: of a booking, and of the booking a hold becomes."""
    return text(MAX_NAME, required=True, metadata=about(f"1 to {MAX_NAME} characters; {STRIPPED}.", "Ada Lovelace"))


def customer_email_field():
    return EmailAddress(required=True, validate=validate.Length(max=MAX_EMAIL), metadata=about(
        f"An e-mail address, at most {MAX_EMAIL} characters.", "ada@example.com"))


class BookingSchema(EndAfterStart, Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    car_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1),
                            metadata=about("The car to book; it must exist and be available.", 1))
    customer_name = customer_name_field()
    customer_email = customer_email_field()
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


class HoldSchema(EndAfterStart, Schema):
    id = fields.Integer(dump_only=True, metadata=about("Given by the service; never reused."))
    car_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1),
                            metadata=about("The car to hold; it must exist and be available.", 1))
    start_datetime = Instant(required=True, metadata=about(START))
    end_datetime = Instant(required=True, metadata=about(END))
    minutes = fields.Integer(load_only=True, strict=True, load_default=DEFAULT_HOLD_MINUTES,
                             validate=validate.Range(min=1, max=MAX_HOLD_MINUTES), metadata=about(
        f"How long the period is held: 1 to {MAX_HOLD_MINUTES} minutes, {DEFAULT_HOLD_MINUTES} if left out.",
        DEFAULT_HOLD_MINUTES))
    expires_at = Instant(dump_only=True, metadata=about(
        "When the hold ends by itself: from this instant its period is free to anyone, and confirming it is a 410."))


class ConfirmSchema(Schema):
    """Who the booking that a hold becomes is for: a booking's own customer fields."""
    customer_name = customer_name_field()
    customer_email = customer_email_field()


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
        "True when a booking of the car for the period, made now, would be accepted.", True))
    reason = fields.String(allow_none=True, metadata=about(
        "Why it would be refused, in the words of the refusal (in the past, in maintenance, a clash); "
        "null when available."))


class OfferSchema(Schema):
    car_id = fields.Integer(metadata=about("The car."))
    start_datetime = Instant(metadata=about("The earliest start at which the car is free for the duration."))
    end_datetime = Instant(metadata=about("start_datetime plus the duration."))
    total_price = Money(attribute="total_cents", metadata=about("What booking this slot costs.", 129.0))
    currency = Currency(metadata=about("The currency of total_price.", "EUR"))

    def dump_slots(self, slots, length):
        """Slots, (start in micros, car) each, as the JSON (bytes) each that `dump` writes, made directly:
        a search answers up to a thousand, and most share a start and a daily price, so each instant
        is written and each price computed once (a test compares the two on many inputs)."""
        car_id, start_key, end_key, price_key, currency_key = (to_json(name) for name in self.dump_fields)
        zone, currency = PRESENTATION.get().zone, to_json(PRESENTATION.get().currency)
        prices, parts, seen = {}, [], None
        for start, car in slots:
            if start != seen:  # slots come by start: a run of equal starts shares its text
                seen, moment, tails = start, EPOCH + start * MICROSECOND, {}
                times = f"{start_key}:{to_json(format_instant(moment, zone))},{end_key}:" \
                        f"{to_json(format_instant(moment + length, zone))},{price_key}:"
            tail = tails.get(car.daily_price)
            if tail is None:
                price = prices.get(car.daily_price)
                if price is None:
                    price = prices[car.daily_price] = to_json(price_cents(car.daily_price, moment, moment + length) / 100)
                tail = tails[car.daily_price] = f"{times}{price},{currency_key}:{currency}}}".encode()
            parts.append(b"{%s:%d," % (car_id.encode(), car.id) + tail)
        return parts


class SlotSchema(Schema):
    start_datetime = Instant(metadata=about("Start of the gap, in the dealership's time zone."))
    end_datetime = Instant(metadata=about("End of the gap: the first instant that is not free."))


class BusySchema(Schema):
    booking_id = fields.Integer(attribute="id", metadata=about("The booking that holds the car."))
    start_datetime = Instant(metadata=about("Its start, not clipped to the period."))
    end_datetime = Instant(metadata=about("Its end, not clipped to the period."))


class WindowInCalendarSchema(Schema):
    window_id = fields.Integer(attribute="id", metadata=about("The maintenance window."))
    start_datetime = Instant(metadata=about("Its start, not clipped to the period."))
    end_datetime = Instant(metadata=about("Its end, not clipped to the period."))
    note = fields.String(metadata=about("What is done."))


class HoldInCalendarSchema(Schema):
    hold_id = fields.Integer(attribute="id", metadata=about("The hold, for a customer who is booking the car."))
    start_datetime = Instant(metadata=about("Its start, not clipped to the period."))
    end_datetime = Instant(metadata=about("Its end, not clipped to the period."))
    expires_at = Instant(metadata=about("When the hold ends, and its period is free again."))


class CalendarSchema(Schema):
    car_id = fields.Integer(metadata=about("The car."))
    start_datetime = Instant(metadata=about("The period asked for: its start."))
    end_datetime = Instant(metadata=about("The period asked for: its end."))
    status = fields.String(metadata=about("The car's status: 'available' or 'maintenance'."))
    turnaround_minutes = fields.Integer(metadata=about("Its dealer's turnaround: the least gap around each entry."))
    available = fields.Boolean(metadata=about(
        "True when a booking of the car for the whole period, made now, would be accepted."))
    reason = fields.String(allow_none=True, metadata=about(
        "Why it would be refused, in the words of the refusal (in the past, in maintenance, a clash); "
        "null when available."))
    busy = fields.List(fields.Nested(BusySchema), metadata=about("The bookings that overlap the period, in time order."))
    maintenance = fields.List(fields.Nested(WindowInCalendarSchema), metadata=about(
        "The maintenance windows that overlap the period, in time order."))
    free = fields.List(fields.Nested(SlotSchema), metadata=about(
        "The gaps inside the period where a booking could go, clipped to it: outside every booking and "
        "window and their turnaround; none for a car in maintenance."))
    held = fields.List(fields.Nested(HoldInCalendarSchema), metadata=about(
        "The holds that overlap the period and have not expired, in time order: each takes its period as a booking does."))


class IndexSchema(Schema):
    """What GET {prefix}/ answers: where to start."""
    name = fields.String(metadata={"description": "The service's name."})
    version = fields.String(metadata={"description": "The API's version."})
    links = fields.Dict(keys=fields.String(), values=fields.String(), metadata={
        "description": "The collections, the searches, where holds are placed, the change feed, and (when "
                       "mounted) the OpenAPI document and the interactive docs, by name."})


class ProblemSchema(Schema):
    """RFC 9457 problem details: the body of every error."""
    title = fields.String(required=True, metadata=about("The HTTP status in words."))
    status = fields.Integer(required=True, metadata=about("The HTTP status code."))
    detail = fields.String(required=True, metadata=about("What was wrong, and how to put it right."))
    errors = fields.Dict(keys=fields.String(), values=fields.List(fields.String()), metadata=about(
        "With 422: each offending field or query parameter, with its messages."))
    request_id = fields.String(metadata=about(
        "The request's id, as in its X-Request-ID response header and in the service's log lines.",
        "4bf92f3577b34da6a3ce929d0e0e4736"))
    next = fields.String(metadata=about(
        "With 410 from the change feed: the cursor to follow the feed from, once the collections are read again."))


CHANGE_TYPES = {"dealer": "dealer", "car": "car", "booking": "booking", "window": "maintenance_window",
                "hold": "hold"}  # kind -> what the change feed calls it
CURSOR_PATTERN = r"^[0-9]{1,18}(\.[0-9]{1,18})?$"


class ChangeSchema(Schema):
    cursor = fields.String(metadata=about("This change's place in the feed: `since` to follow on after it.", "42"))
    type = fields.String(metadata=about("The kind of record: " + ", ".join(f"'{name}'" for name in CHANGE_TYPES.values())
                                        + ".", "booking"))
    id = fields.Integer(metadata=about("The record's id.", 1))
    action = fields.String(metadata=about("'created', 'changed' or 'deleted'.", "created"))
    at = Instant(metadata=about("When the change was made (its transaction's time on PostgreSQL)."))
    record = fields.Raw(allow_none=True, metadata=about(
        "The record as the change left it, as its own GET answers it; null when deleted."))


class ChangesSchema(Schema):
    changes = fields.List(fields.Nested(ChangeSchema), metadata=about(
        "Changes in the order they were committed, each once; at most `limit`."))
    next = fields.String(metadata=about(
        "Send it as `since` to get the changes after these (the same cursor again when there were none).", "42"))


class HistorySchema(Schema):
    at = Instant(metadata=about("When the change was made."))
    action = fields.String(metadata=about("'created', 'changed' or 'deleted' (a booking cancelled).", "changed"))
    key = fields.String(allow_none=True, metadata=about(
        "Who made it: the id of the key (see `flask keys list`), 'configuration' for DEALERSHIP_API_KEY, 'open' when "
        "no key was needed, or null when it was made outside the API (a command, or SQL).", "3"))
    request_id = fields.String(allow_none=True, metadata=about("The X-Request-ID of the request that made it."))
    fields_ = fields.Dict(data_key="fields", keys=fields.String(), values=fields.Dict(), metadata=about(
        "Each field the change set, with its value before and after, as the record's own GET writes them "
        "(before: null for a record created, or one whose earlier history was pruned; after: null once deleted).",
        {"end_datetime": {"before": "2035-06-01T12:00:00+00:00", "after": "2035-06-01T14:00:00+00:00"}}))


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


class PeriodQuery(EndAfterStart, Schema):
    start_datetime = Instant(in_query=True, required=True, metadata=about(
        "Start of the period: an RFC 3339 date-time with an offset, or without one for the "
        "dealership's time zone. In a query string write + as %2B."))
    end_datetime = Instant(in_query=True, required=True, metadata=about(
        "End of the period, after its start; the period is [start, end)."))


class AvailableCarsQuery(PeriodQuery, PageQuery):
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars.", 1))


class FeedQuery(EndAfterStart, Schema):
    start_datetime = Instant(in_query=True, metadata=about(
        "Events that end after it; 30 days before today (00:00 UTC) when left out."))
    end_datetime = Instant(in_query=True, metadata=about(
        f"Events that start before it; 365 days after today (00:00 UTC) when left out. The period is at most "
        f"{MAX_FEED_PERIOD.days} days, and a feed holds at most {MAX_FEED_EVENTS:,} events (more is a 422)."))


class ChangesQuery(Schema):
    since = fields.String(validate=validate.Regexp(CURSOR_PATTERN, error="Is not a cursor: send one that the feed "
                                                                           "gave as `next` or `cursor`."),
                          metadata=about("A cursor the feed gave (`next`, or a change's `cursor`): the changes "
                                         "after it. From the oldest change kept when left out.", "42") |
                          {"pattern": CURSOR_PATTERN})
    limit = Count(load_default=DEFAULT_PAGE, validate=validate.Range(min=1, max=MAX_PAGE), metadata=about(
        f"At most this many changes, 1 to 1000; {DEFAULT_PAGE} when left out.", 100))


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
HOLD_SCHEMA = HoldSchema()
CONFIRM_SCHEMA = ConfirmSchema()
CHANGES_SCHEMA = ChangesSchema()
HISTORY_SCHEMA = HistorySchema()
CHANGE_FEED_QUERY = ChangesQuery()
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
PERIOD_QUERY = PeriodQuery()
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


def store():
    """The store of the app handling this request."""
    return current_app.extensions[EXTENSION]


# -- every request: its id, its metrics and its line in the access log ---------------------------
# Registered on the service's blueprints, and by create_app on the whole app: whichever runs first
# for a request does the work once.

REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_TEXT = re.compile(r"[ -~]{1,200}")  # 1 to 200 printable ASCII characters: a proxy's or a client's
# Query parameters whose values the access log leaves out: customers' details and secrets, by name.
PERSONAL_PARAMETER = re.compile(r"mail|name|phone|key|token|secret|pass", re.IGNORECASE)
PATH_PUNCTUATION = "/:@!$&'()*+,;="  # what the access log keeps as it is in a path, beside letters and digits
PLAIN_PATH = re.compile(f"[A-Za-z0-9._~{re.escape(PATH_PUNCTUATION)}-]*")  # nothing to percent-encode
REFUSAL_BY_STATUS = {400: "invalid_input", 413: "invalid_input", 415: "invalid_input", 422: "invalid_input",
                     401: "unauthorized", 429: "rate_limited"}
access_log = logging.getLogger("dealership.access")
ACCESS_LINE = '%(client)s "%(method)s %(path)s" %(status)s %(bytes)s B %(duration_ms)s ms'


def take_request_id():
    """The request's id: one a host app has set already (as g.request_id), the X-Request-ID the request
    carries if it is 1 to 200 printable ASCII characters, else a new random one."""
    if "request_started" in g:
        return
    g.request_started = time.perf_counter()
    if "request_id" not in g:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = sent if REQUEST_ID_TEXT.fullmatch(sent) else f"{random.getrandbits(128):032x}"


def logged_path():
    """The path and query as the access log writes them: percent-encoded (a line is one line), and
    without the values of personal parameters."""
    path = request.path
    if not PLAIN_PATH.fullmatch(path):
        path = percent_encoded(path, safe=PATH_PUNCTUATION)
    if not request.query_string:
        return path
    pairs = [(name, "..." if PERSONAL_PARAMETER.search(name) else value) for name, value in request.args.items(multi=True)]
    return f"{path}?{urlencode(pairs)}"


def response_size(response):
    """The body's length in bytes; None for one still to be made (streamed)."""
    if response.content_length is not None or response.is_streamed:
        return response.content_length
    return len(response.get_data())


def count_request(metrics, response, seconds):
    """The request in the metrics: by method (an unknown one as "other"), route template (never the
    path: "unmatched" when no route took it) and status, its time, and its refusal if any."""
    method = request.method if request.method in HTTP_METHODS else "other"
    route = request.url_rule.rule if request.url_rule is not None else "unmatched"
    count, duration = metrics.request_series(method, route, response.status_code)
    count.inc()
    duration.observe(seconds)
    refusal = g.get("refusal")
    if refusal == "storage":
        metrics.unavailable.inc()
    elif refusal is not None:
        metrics.refusals.labels(refusal).inc()


def answer_request(response):
    """The request id on the response; the request counted and timed; its line in the access log."""
    if "request_answered" in g:
        return response
    take_request_id()  # if a hook that ran before it refused the request
    g.request_answered = True
    response.headers.setdefault(REQUEST_ID_HEADER, g.request_id)
    seconds = time.perf_counter() - g.request_started
    if current_app.config["DEALERSHIP_METRICS"]:
        count_request(store().metrics, response, seconds)
    if current_app.config["DEALERSHIP_ACCESS_LOG"]:
        fields = {"client": request.remote_addr, "method": request.method, "path": logged_path(),
                  "status": response.status_code, "bytes": response_size(response),
                  "duration_ms": round(seconds * 1000, 2), "request_id": g.request_id}
        if access_log.isEnabledFor(logging.INFO):  # the record made directly: no need to find the caller's frame
            access_log.handle(access_log.makeRecord(access_log.name, logging.INFO, __file__, 0, ACCESS_LINE,
                                                    (fields,), None, extra=fields))
    return response


def observe(blueprint_or_app):
    """Give every request that `blueprint_or_app` handles its id, its metrics and its access log line."""
    blueprint_or_app.before_request(take_request_id)
    blueprint_or_app.after_request(answer_request)


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


def json_array(parts):
    """A JSON array body (bytes, ending with a newline) from items that are already JSON (bytes)."""
    return b"[" + b",".join(parts) + b"]\n"


def json_list(parts, headers=None):
    """A JSON array response from items that are already JSON (bytes)."""
    return json_text(json_array(parts), headers=headers)


def problem(status, title, detail, errors=None, headers=None, **more):
    body = {"title": title, "status": status, "detail": detail} | more
    if errors is not None:
        body["errors"] = errors
    if has_request_context():
        take_request_id()
        body["request_id"] = g.request_id
    return json_text(to_json(PROBLEM_SCHEMA.dump(body)), status, headers, mimetype="application/problem+json")


def shown_name(name):
    """A field or parameter name as a 422 repeats it: a long one cut to MAX_SHOWN_NAME, with an ellipsis."""
    name = str(name)
    return name if len(name) <= MAX_SHOWN_NAME else name[:MAX_SHOWN_NAME - 1] + "\u2026"


def invalid(messages):
    """422 listing each offending field with its messages: at most MAX_ERRORS of them, each name cut
    to MAX_SHOWN_NAME (a body of a million unknown keys, or one key of a megabyte, must not come back
    three times as large), and how many more there were."""
    names = sorted(messages, key=str)
    shown = {shown_name(name): messages[name] for name in names[:MAX_ERRORS]}
    more = f" and {len(names) - MAX_ERRORS} more" if len(names) > MAX_ERRORS else ""
    return problem(422, "Unprocessable Content", f"Invalid input: {', '.join(map(str, shown))}{more}.", shown)


DOMAIN_STATUS = {NotFoundError: 404, ForbiddenError: 403, ConflictError: 409, GoneError: 410, PreconditionFailed: 412}


def refusal_reason(error):
    """What the metrics count an error as: a reason of REFUSAL_REASONS, "storage" for a 503 of the
    database, or None."""
    if isinstance(error, ValidationError):
        return "invalid_input"
    if isinstance(error, StorageUnavailable):
        return "storage"
    if isinstance(error, DomainError):
        return error.reason
    return REFUSAL_BY_STATUS.get(error.code)


def problem_for(error):
    """The one mapping of every error the service raises to problem+json: Werkzeug's HTTP errors
    (keeping their headers: Allow, WWW-Authenticate), marshmallow's validation errors and the
    domain's InvalidError (422, by field), the domain's NotFoundError and ConflictError, and the
    engine's StorageUnavailable (503 with Retry-After). Notes the refusal for the metrics."""
    g.refusal = refusal_reason(error)
    if isinstance(error, ValidationError):
        return invalid(error.messages if isinstance(error.messages, dict) else {error.field_name: error.messages})
    if isinstance(error, InvalidError):
        return invalid({error.field: [str(error)]})
    if isinstance(error, StorageUnavailable):
        return problem(503, "Service Unavailable", str(error), headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, DomainError):
        status = DOMAIN_STATUS[type(error)]
        more = {"next": error.next} if hasattr(error, "next") else {}
        return problem(status, HTTP_STATUS_CODES[status], str(error), **more)
    response = problem(error.code, error.name, error.description)
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers.add(name, value)
    return response


def handle_errors(blueprint_or_app):
    """Register problem_for for every error the service raises. By code as well as by class: Flask
    looks a handler up by code first, in the blueprint and then in the app, so a host's own 404
    page would otherwise answer for the service's routes."""
    for code in default_exceptions:
        blueprint_or_app.register_error_handler(code, problem_for)
    for error in (HTTPException, ValidationError, DomainError, StorageUnavailable):
        blueprint_or_app.register_error_handler(error, problem_for)


handle_errors(bp)
observe(bp)


@bp.before_request
def path_as_written():
    """Werkzeug's router drops extra slashes at the start of a path (PATH_INFO //api/v1/cars would be
    /api/v1/cars), whatever merge_slashes says: a URL is taken as written, so that one is a 404."""
    if request.environ.get("PATH_INFO", "").startswith("//"):
        raise NotFound()


def docs_url():
    """Where the interactive docs of the app handling this request are."""
    return f"{request.script_root}{current_app.extensions[DOCS]}/docs"


def needs_key(method, view):
    """With DEALERSHIP_API_KEY set: every write needs it, and so do the reads of bookings, which hold
    customers' names and e-mail addresses. Cars, dealers, available-cars and calendars stay open."""
    return method in WRITE_METHODS or view.api_doc["personal"]


def keys_in_force():
    """Whether requests that need a key must carry one: DEALERSHIP_API_KEY is set, or a key was made."""
    return bool(current_app.config["DEALERSHIP_API_KEY"]) or store().keys_made()


def key_required():
    """Whether the request being handled must carry an API key."""
    view = current_app.view_functions.get(request.endpoint)
    return view is not None and needs_key(request.method, view) and keys_in_force()


def sent_key():
    """The Bearer token the request carries, or ""."""
    if "Authorization" not in request.headers:  # most requests to an open service: no header to parse
        return ""
    auth = request.authorization
    return auth.token if auth is not None and auth.type == "bearer" and auth.token else ""


def carries(key):
    """Whether the request carries `key` as its Bearer token (compared in constant time)."""
    return bool(key) and hmac.compare_digest(sent_key().encode(), key.encode())


def sent_access():
    """The Access of the key the request carries (DEALERSHIP_API_KEY, or a key made with `keys add`
    that has not been revoked), or None; looked up once per request."""
    if "sent_access" not in g:
        token = sent_key()
        g.sent_access = CONFIGURED if carries(current_app.config["DEALERSHIP_API_KEY"]) else \
            store().key_access(token) if token else None
    return g.sent_access


def caller():
    """The Access of the request being handled (see require_api_key)."""
    return g.get("access") or OPEN


def visible(record):
    """`record`, if the request's key may act on it (see check_access)."""
    allow = permission()
    if allow is not None:
        allow(record, store().fleet)
    return record


def permission():
    """What the write or read of the request being handled may touch: None for an admin key, else a
    function of a record and the fleet that raises unless the key may act on it (check_access)."""
    access = caller()
    return None if access.role == "admin" else functools.partial(check_access, access)


@bp.before_request
def require_api_key():
    """A request that needs a key (a write, or a read of customers' data) must carry one as a Bearer
    token once keys are in force (see keys_in_force), of a role its route admits (api_doc's roles):
    else 401, or 403 naming the roles it needs. Its Access is kept (g.access), and who makes its
    writes (WRITER) for the history."""
    view = current_app.view_functions.get(request.endpoint)
    if view is None or not needs_key(request.method, view):
        return
    access = sent_access() if sent_key() else None  # looked up first: a key found shows keys are in force
    if not keys_in_force():
        access = OPEN
    if access is None:
        current_app.extensions[REFUSED_KEYS].note(request.remote_addr, request.method, request.path)
        what = "changes data" if request.method in WRITE_METHODS else "reads customers' names and e-mail addresses"
        why = "The API key does not match a key in force" if sent_key() else "No API key was sent"
        raise Unauthorized(f"{why}: this request {what}, so send 'Authorization: Bearer <API key>'.",
                           www_authenticate=WWWAuthenticate("bearer", {"realm": "dealership"}))
    roles = view.api_doc["roles"]
    if access.role not in roles:
        raise ForbiddenError(f"This needs a key of role {' or '.join(roles)}: {access} is not one. A staff key acts "
                             f"on {ROLE_DUTIES['staff']}; a booking key on {ROLE_DUTIES['booking']}.")
    g.access = access
    g.writer = WRITER.set((access.who, g.get("request_id")))


@bp.teardown_request
def forget_writer(error=None):
    """The request's writer is not the next one's, on the same thread."""
    if "writer" in g:
        WRITER.reset(g.pop("writer"))


class RefusedKeyLog:
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
    """Answer from a fleet that holds what every process has committed. A POST or DELETE reads
    nothing before its own write transaction, which catches up in any case (a route that does read
    first calls sync itself)."""
    if request.method not in ("POST", "DELETE"):
        store().sync()


def request_body(read):
    """`read()` of the request body, within DEALERSHIP_MAX_CONTENT_LENGTH: past it, a 413 that says so."""
    limit = request.max_content_length = current_app.config["DEALERSHIP_MAX_CONTENT_LENGTH"]
    try:
        return read()
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(f"The body is larger than the limit of {limit} bytes.") from None


# -- Idempotency-Key: a retried POST, PUT or PATCH gets the first one's answer, and changes nothing --

IDEMPOTENCY_KEY = re.compile(r"[ -~]{1,255}")  # 1 to 255 printable ASCII characters
KEYED_METHODS = frozenset({"POST", "PUT", "PATCH"})


def fingerprint():
    """What makes two requests the same one: method, path and query, body, and the API key sent."""
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.full_path.encode(), request_body(request.get_data),
                 sent_key().encode()):
        digest.update(b"%d:" % len(part) + part)
    return digest.hexdigest()


@bp.before_request
def idempotency_key():
    """A POST, PUT or PATCH with an Idempotency-Key: answered again as the first time if that request
    succeeded (Idempotent-Replayed: true), a 422 if the key was used for another request, a 409 while
    the first is still being handled here. Otherwise it runs, and `answer_write` keeps its answer."""
    if request.method not in KEYED_METHODS:
        return None
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    if not IDEMPOTENCY_KEY.fullmatch(key):
        raise BadRequest(f"{IDEMPOTENCY_HEADER} must be 1 to 255 printable ASCII characters (a UUID, say): "
                         "a new one for each new request, the same one to retry a request.")
    key = f"{caller().who} {key}"  # each API key's Idempotency-Keys are its own
    keyed = KeyedWrite(key, fingerprint(), timedelta(hours=current_app.config["DEALERSHIP_IDEMPOTENCY_HOURS"]))
    in_flight = store().key_in_flight(key)
    in_flight.__enter__()

    @after_this_request
    def release(response):  # runs for every answer, a refusal or a 500 included
        in_flight.__exit__(None, None, None)
        return response
    g.keyed = keyed
    answer = store().kept_answer(keyed)
    return None if answer is None else replayed(answer)


def replayed(answer):
    """The answer kept for an Idempotency-Key, given again."""
    status, headers, body = answer
    return Response(body, status, headers | {"Idempotent-Replayed": "true"}, mimetype="application/json")


KEPT_HEADERS = ("Location", "ETag")  # what an answer kept for an Idempotency-Key keeps beside status and body


def answer_write(write, answer):
    """`answer(write())`: the response to a write, made by `answer` from its result. With an
    Idempotency-Key, the answer is made and kept with the key inside the write's own transaction;
    if another process answered the same request first, that answer is given again."""
    keyed = g.get("keyed")
    if keyed is None:
        return answer(write())

    def kept(result):
        response = answer(result)
        headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
        return response.status_code, headers, response.get_data()
    keyed.answer, keyed.context = kept, contextvars.copy_context()
    token = IDEMPOTENT.set(keyed)
    try:
        write()
    except Replayed as again:
        return replayed(again.answer)
    finally:
        IDEMPOTENT.reset(token)
    status, headers, body = keyed.response
    return json_text(body, status, headers)


# -- conditional requests: a record's ETag is its version, kept in the store of record ---------------

def not_modified(tag):
    """304 Not Modified when the request's If-None-Match names `tag`; otherwise None."""
    if "If-None-Match" not in request.headers or not request.if_none_match.contains_weak(tag):
        return None
    response = Response(status=304, headers={"Cache-Control": "no-cache"})
    response.set_etag(tag)
    return response


def record_tag(record, presentation=None):
    """A record's strong ETag (unquoted): its version, and the zone and currency its JSON is written in."""
    return f"{record.version}.{(presentation or PRESENTATION.get()).tag}"


def with_tag(response, record):
    """`response` (a record's JSON) with the record's ETag."""
    response.headers["ETag"] = f'"{record_tag(record)}"'
    return response


def tagged(record, answer):
    """A GET of one record: 304 when If-None-Match names its ETag, else `answer(record)` (which carries it)."""
    return not_modified(record_tag(record)) or answer(record)


def expected():
    """What the request's If-Match asks of the record it changes or deletes: None without one, else
    a function of the record as stored, raising PreconditionFailed unless one of the tags (or *) is
    its ETag. Called inside the write, in the same step as the write's own checks."""
    if "If-Match" not in request.headers:
        return None
    if_match = request.if_match
    if not if_match:  # an empty header asks nothing
        return None
    presentation = PRESENTATION.get()

    def expect(record):
        if not if_match.contains(record_tag(record, presentation)):
            raise PreconditionFailed(
                f"If-Match names another version of this record than the one stored (ETag "
                f"\"{record_tag(record, presentation)}\"): it changed since it was read, and nothing was changed. "
                "Read it again (GET), check the change still makes sense, and send it with the new ETag.")
    return expect


def json_body():
    """The request body as a JSON object, or a 415/413/400 that says what was wrong."""
    if not request.is_json:
        raise UnsupportedMediaType("Send the body as JSON with 'Content-Type: application/json'.")
    try:
        body = request_body(request.get_json)
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


def paged(items, filters):
    """The page of `items` that `limit` and `offset` ask for (all from `offset` on without a limit),
    and its headers."""
    offset, limit = filters["offset"], filters.get("limit")
    page = items[offset:None if limit is None else offset + limit]
    return page, page_headers(len(items), offset, limit)


class Renderings:
    """Rendered forms of immutable records, kept per app (an app's zone and currency are in them):
    each car's JSON, the whole fleet's list, and the parts that available-cars answers are joined
    from. A record is a new object after each change, so a rendering kept beside its record is
    current exactly while the record is."""

    def __init__(self):
        self.cars = {}  # car id -> (the record, its JSON)
        self.fleet = None  # (the fleet, its cars_version, the list's JSON, how many cars)
        self.chunks, self.chunks_of = {}, None  # (byte index << 8 | byte) -> JSON of those cars; their Offerable

    def car(self, car):
        known = self.cars.get(car.id)
        if known is None or known[0] is not car:
            if len(self.cars) > MAX_CHUNKS:
                self.cars.clear()
            known = self.cars[car.id] = (car, to_json(CAR_SCHEMA.dump(car)).encode())
        return known[1]

    def fleet_list(self, fleet):
        """Every car as one JSON array (bytes) and their count, made once after each change of a car."""
        known = self.fleet
        if known is None or known[0] is not fleet or known[1] != fleet.cars_version:
            cars = list(fleet.cars.values())
            known = self.fleet = (fleet, fleet.cars_version, json_array([self.car(car) for car in cars]), len(cars))
        return known[2], known[3]

    def free_cars(self, mask, offerable):
        """The cars of a mask over the positions of `offerable`, as a JSON array (bytes), joined eight
        cars at a time from parts kept after each first use."""
        if self.chunks_of is not offerable or len(self.chunks) > MAX_CHUNKS:
            self.chunks, self.chunks_of = {}, offerable
        chunks, parts = self.chunks, []
        for i, byte in enumerate(mask.to_bytes((mask.bit_length() + 7) // 8, "little")):
            if byte:
                chunk = chunks.get(i << 8 | byte)
                if chunk is None:
                    chunk = chunks[i << 8 | byte] = b",".join([self.car(offerable.cars[i * 8 + n]) for n in BITS[byte]])
                parts.append(chunk)
        return json_array(parts)


def renderings():
    return current_app.extensions[RENDERINGS]


def api_doc(tag, *, returns=None, many=False, status=200, body=None, query=None, errors=(), headers=(),
            personal=False, media=None, versioned=False, roles=("admin",)):
    """Record what the OpenAPI document says of a route: the schemas are the ones the route uses.

    Errors that follow from the route's shape are added by the document itself: 404 for a path id,
    400/413/415/422 for a body, 422 for a query, 401 for a write or a `personal` read (see needs_key).
    A route that answers another media type than JSON (`media`) answers text, with an ETag. A
    `versioned` route reads or changes one record: it answers with the record's ETag and takes
    If-None-Match (GET) or If-Match (a change). `roles`: the roles of key a write or personal read
    admits (ROLES; check_access then says which records each may act on).
    """
    def attach(view):
        view.api_doc = {"tag": tag, "returns": returns, "many": many, "status": status, "body": body,
                        "query": query, "errors": errors, "headers": headers, "personal": personal, "media": media,
                        "versioned": versioned, "roles": roles}
        return view
    return attach


@bp.get("/", strict_slashes=False)
@api_doc("service", returns=INDEX_SCHEMA)
def index():
    """Where to start

    The collections, the search for free cars and, when mounted, the docs.
    """
    links = {"cars": url_for(".list_cars"), "bookings": url_for(".list_bookings"),
             "available_cars": url_for(".available_cars"), "available_slots": url_for(".available_slots"),
             "dealers": url_for(".list_dealers"), "holds": url_for(".create_hold"), "changes": url_for(".list_changes")}
    if DOCS in current_app.extensions:
        links |= {"openapi": url_for(f"{DOCS}.openapi_json"), "docs": docs_url()}
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
    dealers = list(store().fleet.dealers.values())
    return json_response(DEALER_SCHEMA.dump(dealers, many=True), headers={"X-Total-Count": str(len(dealers))})


def dealer_answer(dealer, status=200):
    """A dealer as the API answers it, with its ETag (and, new, its Location)."""
    headers = {"Location": url_for(".get_dealer", dealer_id=dealer.id)} if status == 201 else None
    return with_tag(json_response(DEALER_SCHEMA.dump(dealer), status, headers), dealer)


@bp.post("/dealers")
@api_doc("dealers", returns=DEALER_SCHEMA, status=201, body=DEALER_SCHEMA, headers=["Location", "ETag"])
def create_dealer():
    """Add a dealer"""
    fields = DEALER_SCHEMA.load(json_body())
    return answer_write(lambda: store().add_dealer(fields), functools.partial(dealer_answer, status=201))


@bp.get("/dealers/<digits:dealer_id>")
@api_doc("dealers", returns=DEALER_SCHEMA, versioned=True)
def get_dealer(dealer_id):
    """Get one dealer"""
    dealer = store().fleet.dealer(dealer_id)
    return tagged(dealer, dealer_answer)


@bp.patch("/dealers/<digits:dealer_id>")
@api_doc("dealers", returns=DEALER_SCHEMA, body=DEALER_CHANGES, versioned=True)
def update_dealer(dealer_id):
    """Change a dealer

    Only the fields given change. A new turnaround applies to bookings and maintenance windows made or
    moved from then on; the ones that exist stay valid.
    """
    store().fleet.dealer(dealer_id)  # an unknown dealer is a 404 before its body is judged
    changes = DEALER_CHANGES.load(json_body())
    return answer_write(lambda: store().update_dealer(dealer_id, changes, expected()), dealer_answer)


@bp.delete("/dealers/<digits:dealer_id>")
@api_doc("dealers", status=204, errors=[409], versioned=True)
def delete_dealer(dealer_id):
    """Remove a dealer

    Only a dealer that has no cars.
    """
    store().delete_dealer(dealer_id, expected())
    return no_content()


# ---------------------------------------------------------------------------------------------
# Routes: cars
# ---------------------------------------------------------------------------------------------


def car_answer(car, status=200):
    """A car as the API answers it, with its ETag (and, new, its Location)."""
    headers = {"Location": url_for(".get_car", car_id=car.id)} if status == 201 else None
    return with_tag(json_text(renderings().car(car), status, headers), car)


@bp.post("/cars")
@api_doc("cars", returns=CAR_SCHEMA, status=201, body=CAR_SCHEMA, errors=[404, 409], headers=["Location", "ETag"],
         roles=("admin", "staff"))
def create_car():
    """Add a car to the inventory"""
    fields = CAR_SCHEMA.load(json_body())
    check_dealer(caller(), fields["dealer_id"])
    return answer_write(lambda: store().add_car(fields), functools.partial(car_answer, status=201))


@bp.get("/cars")
@api_doc("cars", returns=CAR_SCHEMA, many=True, query=CAR_QUERY, headers=["X-Total-Count", "Link"])
def list_cars():
    """List the cars

    Ordered by id, optionally filtered by status, dealer and brand, and paged.
    """
    if not request.args:  # the whole fleet: ready made
        body, total = store().read(renderings().fleet_list)
        return json_text(body, headers={"X-Total-Count": str(total)})
    filters = query(CAR_QUERY)
    status, dealer_id = filters.get("status"), filters.get("dealer_id")
    brand = filters.get("brand", "").strip().casefold()
    cars = [car for car in list(store().fleet.cars.values())
            if (status is None or car.status == status)
            and (dealer_id is None or car.dealer_id == dealer_id)
            and (not brand or car.brand.casefold() == brand)]
    page, headers = paged(cars, filters)
    return json_list([renderings().car(car) for car in page], headers)


@bp.get("/cars/<digits:car_id>")
@api_doc("cars", returns=CAR_SCHEMA, versioned=True)
def get_car(car_id):
    """Get one car"""
    car = store().fleet.car(car_id)
    return tagged(car, car_answer)


@bp.route("/cars/<digits:car_id>", methods=["PUT", "PATCH"])
@api_doc("cars", returns=CAR_SCHEMA, body=CAR_CHANGES, errors=[409], versioned=True, roles=("admin", "staff"))
def update_car(car_id):
    """Change a car

    Only the fields given change; the others keep their values.
    """
    visible(store().fleet.car(car_id))  # an unknown car is a 404 (and another dealer's a 403) before its body is judged
    changes = CAR_CHANGES.load(json_body())
    if "dealer_id" in changes:
        check_dealer(caller(), changes["dealer_id"])
    return answer_write(lambda: store().update_car(car_id, changes, expected(), permission()), car_answer)


@bp.delete("/cars/<digits:car_id>")
@api_doc("cars", status=204, errors=[409], versioned=True, roles=("admin", "staff"))
def delete_car(car_id):
    """Remove a car

    Only a car that has no bookings and no hold.
    """
    store().delete_car(car_id, expected(), permission())
    return no_content()


@bp.get("/cars/<digits:car_id>/availability")
@api_doc("cars", returns=CALENDAR_SCHEMA, query=PERIOD_QUERY)
def car_availability(car_id):
    """See when a car is busy or free

    The bookings and maintenance windows that overlap the period, and the gaps inside it where a
    booking could go (with the dealer's turnaround kept free around each entry).
    """
    store().fleet.car(car_id)  # an unknown car is a 404 before its query is judged
    period = query(PERIOD_QUERY)
    start, end = period["start_datetime"], period["end_datetime"]
    car, entries, free, refusal = store().read(Fleet.calendar, car_id, start, end, datetime.now(timezone.utc))
    return json_response(CALENDAR_SCHEMA.dump({
        "car_id": car.id, "start_datetime": start, "end_datetime": end, "status": car.status,
        "turnaround_minutes": store().fleet.dealer(car.dealer_id).turnaround_minutes,
        "available": refusal is None, "reason": refusal,
        "busy": [entry for entry in entries if type(entry) is Booking],
        "maintenance": [entry for entry in entries if type(entry) is MaintenanceWindow],
        "held": [entry for entry in entries if type(entry) is Hold],
        "free": [{"start_datetime": s, "end_datetime": e} for s, e in free],
    }))


@bp.get("/cars/<digits:car_id>/quote")
@api_doc("cars", returns=QUOTE_SCHEMA, query=PERIOD_QUERY)
def quote(car_id):
    """Price a booking

    What booking the car for the period would cost now, and whether it can be booked; nothing is booked.
    """
    car = store().fleet.car(car_id)  # an unknown car is a 404 before its query is judged
    period = query(PERIOD_QUERY)
    start, end = period["start_datetime"], period["end_datetime"]
    refusal = store().read(Fleet.refusal, car_id, start, end, datetime.now(timezone.utc))
    return json_response(QUOTE_SCHEMA.dump({
        "car_id": car.id, "start_datetime": start, "end_datetime": end, "days": rental_days(start, end),
        "daily_price": car.daily_price, "total_cents": price_cents(car.daily_price, start, end),
        "available": refusal is None, "reason": refusal}))


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
    page, headers = paged(store().read(Fleet.car_windows, car_id), filters)
    return json_response(WINDOW_SCHEMA.dump(page, many=True), headers=headers)


@bp.post("/cars/<digits:car_id>/maintenance-windows")
@api_doc("maintenance", returns=WINDOW_SCHEMA, status=201, body=WINDOW_SCHEMA, errors=[409], headers=["Location", "ETag"],
         roles=("admin", "staff"))
def create_window(car_id):
    """Take a car out of service for a period

    No booking can be made over the window, nor within the dealer's turnaround of it. The window may
    not overlap a booking or another window: the 409 names the bookings in the way.
    """
    store().sync()  # unlike other POSTs, this one reads before it writes (see catch_up)
    visible(store().fleet.car(car_id))  # an unknown car is a 404 (another dealer's a 403) before its body is judged
    fields = WINDOW_SCHEMA.load(json_body())
    return answer_write(lambda: store().add_window(car_id, fields, permission()),
                        functools.partial(window_answer, status=201))


def window_answer(window, status=200):
    """A maintenance window as the API answers it, with its ETag (and, new, its Location)."""
    headers = {"Location": url_for(".get_window", car_id=window.car_id, window_id=window.id)} if status == 201 else None
    return with_tag(json_response(WINDOW_SCHEMA.dump(window), status, headers), window)


@bp.get("/cars/<digits:car_id>/maintenance-windows/<digits:window_id>")
@api_doc("maintenance", returns=WINDOW_SCHEMA, versioned=True)
def get_window(car_id, window_id):
    """Get one maintenance window"""
    window = store().fleet.window(car_id, window_id)
    return tagged(window, window_answer)


@bp.delete("/cars/<digits:car_id>/maintenance-windows/<digits:window_id>")
@api_doc("maintenance", status=204, versioned=True, roles=("admin", "staff"))
def delete_window(car_id, window_id):
    """Remove a maintenance window

    Its time can be booked again.
    """
    store().delete_window(car_id, window_id, expected(), permission())
    return no_content()


# ---------------------------------------------------------------------------------------------
# Routes: bookings
# ---------------------------------------------------------------------------------------------


@bp.post("/bookings")
@api_doc("bookings", returns=BOOKING_SCHEMA, status=201, body=BOOKING_SCHEMA, errors=[404, 409],
         headers=["Location", "ETag"], roles=ROLES)
def create_booking():
    """Book a car

    For the period from start_datetime up to end_datetime: it must not overlap another booking of
    the car, nor start in the past.
    """
    fields = BOOKING_SCHEMA.load(json_body()) | {"made_by": caller().who}
    return answer_write(lambda: store().add_booking(fields, permission()),
                        functools.partial(booking_answer, status=201))


def booking_answer(booking, status=200):
    """A booking as the API answers it, with its ETag (and, new, its Location)."""
    headers = {"Location": url_for(".get_booking", booking_id=booking.id)} if status == 201 else None
    return with_tag(json_response(BOOKING_SCHEMA.dump(booking), status, headers), booking)


@bp.get("/bookings")
@api_doc("bookings", returns=BOOKING_SCHEMA, many=True, query=BOOKING_QUERY, headers=["X-Total-Count", "Link"],
         personal=True, roles=ROLES)
def list_bookings():
    """List the bookings

    Ordered by start then id, filtered by car, customer and period, and paged. A staff key lists only
    its dealer's bookings, a booking key only those it made (and X-Total-Count counts only those).
    """
    filters = query(BOOKING_QUERY)
    offset, limit = filters["offset"], filters.get("limit", DEFAULT_PAGE)
    page, total = store().read(Fleet.find_bookings, offset, limit, filters.get("car_id"),
                               filters.get("start_datetime"), filters.get("end_datetime"), filters.get("customer_email"),
                               caller())
    return json_response(BOOKING_SCHEMA.dump(page, many=True), headers=page_headers(total, offset, limit))


@bp.get("/bookings/<digits:booking_id>")
@api_doc("bookings", returns=BOOKING_SCHEMA, personal=True, versioned=True, roles=ROLES)
def get_booking(booking_id):
    """Get one booking"""
    booking = visible(store().fleet.booking(booking_id))
    return tagged(booking, booking_answer)


@bp.patch("/bookings/<digits:booking_id>")
@api_doc("bookings", returns=BOOKING_SCHEMA, body=BOOKING_CHANGES, errors=[409], versioned=True, roles=ROLES)
def change_booking(booking_id):
    """Move or edit a booking

    In one step: on any error the booking stays exactly as it was.
    """
    visible(store().fleet.booking(booking_id))  # an unknown booking is a 404 before its body is judged
    changes = BOOKING_CHANGES.load(json_body())
    return answer_write(lambda: store().change_booking(booking_id, changes, expected(), permission()),
                        booking_answer)


@bp.delete("/bookings/<digits:booking_id>")
@api_doc("bookings", status=204, versioned=True, roles=ROLES)
def cancel_booking(booking_id):
    """Cancel a booking

    Its time is free again.
    """
    store().cancel_booking(booking_id, expected(), permission())
    return no_content()


@bp.get("/bookings/available-cars")
@api_doc("bookings", returns=CAR_SCHEMA, many=True, query=AVAILABLE_CARS_QUERY,
         headers=["X-Total-Count", "Link"])
def available_cars():
    """Find the cars free for a whole period

    Cars whose status is available and that have no booking overlapping the period, ordered by id.
    """
    filters = query(AVAILABLE_CARS_QUERY)
    free, offerable = store().read(Fleet.free_cars, filters["start_datetime"], filters["end_datetime"],
                                   filters.get("dealer_id"))
    if "limit" not in filters and not filters["offset"]:  # the whole answer, joined from ready parts
        return json_text(renderings().free_cars(free, offerable), headers={"X-Total-Count": str(free.bit_count())})
    page, headers = paged(store().read(Fleet.cars_at, free, offerable), filters)
    return json_list([renderings().car(car) for car in page], headers)


@bp.get("/bookings/available-slots")
@api_doc("bookings", returns=OFFER_SCHEMA, many=True, query=SLOT_QUERY, headers=["X-Total-Count", "Link"])
def available_slots():
    """Find when a car is free for a duration

    For each car that can be booked and matches the filters, the earliest period of the duration that
    starts at or after `after` and ends by `before` with the dealer's turnaround kept free around it;
    ordered by start, then car id. Cars with no such period are left out. Booking a slot succeeds
    unless someone else takes it first.
    """
    filters = query(SLOT_QUERY)
    now = datetime.now(timezone.utc)
    now = now.replace(second=0, microsecond=0) + timedelta(minutes=1)  # a start people can read
    after = min(max(filters.get("after", now), now), LATEST_SLOT_END)
    before = min(filters["before"] if "before" in filters else after + MAX_SLOT, LATEST_SLOT_END)
    offset, limit = filters["offset"], filters.get("limit", DEFAULT_PAGE)
    page, total = store().read(Fleet.free_slots, filters["duration"], after, before, offset, limit,
                               filters.get("dealer_id"), filters.get("brand"), filters.get("car_id"))
    return json_list(OFFER_SCHEMA.dump_slots(page, filters["duration"]), page_headers(total, offset, limit))


# ---------------------------------------------------------------------------------------------
# Routes: holds, for a customer who is still checking out
# ---------------------------------------------------------------------------------------------


def hold_answer(hold, status=200):
    headers = {"Location": url_for(".get_hold", hold_id=hold.id)} if status == 201 else None
    return json_response(HOLD_SCHEMA.dump(hold), status, headers)


@bp.post("/holds")
@api_doc("holds", returns=HOLD_SCHEMA, status=201, body=HOLD_SCHEMA, errors=[404, 409], headers=["Location"], roles=ROLES)
def create_hold():
    """Hold a car's period while a customer books

    For `minutes` (1 to 30, 10 if left out) the period is taken exactly as a booking takes it: the same
    overlap, turnaround and maintenance rules, and every search, calendar and the board see it. Confirm
    it before `expires_at` to turn it into a booking; from that instant it is free to anyone again.
    """
    fields = HOLD_SCHEMA.load(json_body()) | {"made_by": caller().who}
    minutes = fields.pop("minutes")
    return answer_write(lambda: store().add_hold(fields, minutes, permission()),
                        functools.partial(hold_answer, status=201))


@bp.get("/holds/<digits:hold_id>")
@api_doc("holds", returns=HOLD_SCHEMA, errors=[410])
def get_hold(hold_id):
    """Get one hold

    A hold that has expired is a 410 (until the service forgets it, a day later: then a 404).
    """
    return hold_answer(store().read(Fleet.hold, hold_id, datetime.now(timezone.utc)))


@bp.delete("/holds/<digits:hold_id>")
@api_doc("holds", status=204, errors=[410], roles=ROLES)
def delete_hold(hold_id):
    """Let a hold go

    Its period is free again at once.
    """
    store().delete_hold(hold_id, permission())
    return no_content()


@bp.post("/holds/<digits:hold_id>/confirm")
@api_doc("holds", returns=BOOKING_SCHEMA, status=201, body=CONFIRM_SCHEMA, errors=[409, 410], headers=["Location", "ETag"],
         roles=ROLES)
def confirm_hold(hold_id):
    """Book a held period

    In one step the hold becomes a booking of its car and period for the customer (priced at the car's
    price of now), and is gone. A hold that has expired is a 410: nothing is booked.
    """
    store().sync()  # unlike other POSTs, this one reads before it writes (see catch_up)
    visible(store().read(Fleet.hold, hold_id, datetime.now(timezone.utc)))  # a 404 (or 403) before its body is judged
    customer = CONFIRM_SCHEMA.load(json_body())
    return answer_write(lambda: store().confirm_hold(hold_id, customer, permission()),
                        functools.partial(booking_answer, status=201))


# ---------------------------------------------------------------------------------------------
# Routes: the change feed, for systems that follow every change
# ---------------------------------------------------------------------------------------------

RECORD_SCHEMAS = {"dealer": DEALER_SCHEMA, "car": CAR_SCHEMA, "booking": BOOKING_SCHEMA, "window": WINDOW_SCHEMA,
                  "hold": HOLD_SCHEMA}


@bp.get("/changes")
@api_doc("changes", returns=CHANGES_SCHEMA, query=CHANGE_FEED_QUERY, errors=[410], personal=True)
def list_changes():
    """Follow every change

    Every change to dealers, cars, bookings, maintenance windows and holds, in the order they were
    committed, each once, with the record as it then stood. Start without `since`, then send the
    `next` of each answer as `since`. A cursor older than the oldest change kept (those of the last
    DEALERSHIP_HISTORY_DAYS are kept, and the newest 10,000) is a 410: read the collections again,
    then follow from the cursor that answer gives.
    """
    filters = query(CHANGE_FEED_QUERY)
    after = None
    if "since" in filters:
        after = store().engine.read_cursor(filters["since"])
        if after is None:
            raise ValidationError({"since": ["Is not a cursor of this service's database: send one the feed gave."]})
    page, cursor = store().changes(after, filters["limit"])
    changes = [{"cursor": at_cursor, "type": CHANGE_TYPES[kind], "id": record_id, "action": action, "at": at,
                "record": None if record is None else RECORD_SCHEMAS[kind].dump(record)}
               for at_cursor, kind, record_id, action, at, record in page]
    return json_response(CHANGES_SCHEMA.dump({"changes": changes, "next": cursor}))


def history_answer(kind, record_id, lookup):
    """A record's history (see Store.history) as the API answers it, if the key may read the record
    (as it stands, or as it last stood when deleted); `lookup(record_id)` is the fleet's 404."""
    entries = store().history(kind, record_id)
    last = next((record for _, _, record, *_ in reversed(entries) if record is not None), None)
    if last is None:
        visible(lookup(record_id))
    elif kind == "booking" and entries[-1][2] is None and caller().role == "staff":
        # a cancelled booking: staff of the dealer its car was at then, not of one it moved to since
        cancelled = entries[-1][-1]
        car_then = next((car for _, _, car, _, _, seq in reversed(store().history("car", last.car_id))
                         if seq < cancelled), None)
        check_access(caller(), last, SimpleNamespace(cars={last.car_id: car_then} if car_then else {}))
    else:
        visible(last)
    answer, before = [], {}
    for action, at, record, who, request_id, _ in entries:
        after = {} if record is None else RECORD_SCHEMAS[kind].dump(record)
        after.pop("id", None)
        changed_fields = {name: {"before": before.get(name), "after": after.get(name)}
                          for name in {**before, **after} if before.get(name) != after.get(name)}
        answer.append({"at": at, "action": action, "key": who, "request_id": request_id, "fields_": changed_fields})
        before = after
    return json_response(HISTORY_SCHEMA.dump(answer, many=True))


@bp.get("/bookings/<digits:booking_id>/history")
@api_doc("bookings", returns=HISTORY_SCHEMA, many=True, personal=True, roles=ROLES)
def booking_history(booking_id):
    """Who changed a booking, and how

    Every change the change log keeps (DEALERSHIP_HISTORY_DAYS), oldest first, with the key that made
    it, its request id and the fields before and after; also once the booking is cancelled.
    """
    return history_answer("booking", booking_id, store().fleet.booking)


@bp.get("/cars/<digits:car_id>/history")
@api_doc("cars", returns=HISTORY_SCHEMA, many=True, personal=True, roles=("admin", "staff"))
def car_history(car_id):
    """Who changed a car, and how

    As a booking's history, for a car: also once it is removed.
    """
    return history_answer("car", car_id, store().fleet.car)


# ---------------------------------------------------------------------------------------------
# Routes: calendar feeds (iCalendar), for the calendar programs staff already use
# ---------------------------------------------------------------------------------------------

FEED_PAST, FEED_AHEAD = timedelta(days=30), timedelta(days=365)


def feed_period(filters, today):
    """The period a feed covers: as asked, or from 30 days ago to 365 days ahead, counted from
    today's midnight (UTC), so that the feed stays the same all day while nothing changes."""
    start = filters.get("start_datetime", today - FEED_PAST)
    end = filters.get("end_datetime", today + FEED_AHEAD)
    check_period(start, end)  # a start given alone may fall after the default end
    if end - start > MAX_FEED_PERIOD:
        raise InvalidError("end_datetime", f"The period is longer than {MAX_FEED_PERIOD.days} days, the longest a "
                                           "feed covers: ask for a shorter one.")
    return start, end


def entity_tag(*parts):
    """An ETag for a response made from the fleet as it stands and from `parts` (whatever else its
    body depends on). Taken before the body is made: a change in between makes the tag older than
    the body (the next request gets a 200), never newer (a 304 for something the client lacks)."""
    key = repr((store().data_version(), str(store().zone), PRESENTATION.get().currency, *parts))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


class FeedText(icalendar.vText):
    """Text as RFC 5545 escapes it: backslash, semicolon, comma, line break. (icalendar's own escaping
    first reads a backslash followed by N as a line break, so a note such as 'C:\\Notes\\N42' would
    reach calendars broken over two lines.)"""

    def to_ical(self):
        text = str(self).replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
        return text.replace("\r\n", "\\n").replace("\n", "\\n").encode(self.encoding)


def ical(name, entries, stamp):
    """An iCalendar (RFC 5545) document of (car, entry) pairs: one VEVENT per entry, its UID stable
    (made from the entry's kind and id), its times in UTC, its DTSTAMP `stamp`."""
    calendar = icalendar.Calendar()
    calendar.add("prodid", "-//Dealership API//EN")
    calendar.add("version", "2.0")
    calendar.add("x-wr-calname", FeedText(f"Dealership: {name}"))
    for car, entry in entries:
        event = icalendar.Event()
        if type(entry) is Booking:
            event.add("uid", f"booking-{entry.id}@dealership")
            event.add("summary", FeedText(f"Booked: {car.brand} {car.model} (booking {entry.id})"))
        elif type(entry) is Hold:
            event.add("uid", f"hold-{entry.id}@dealership")
            event.add("summary", FeedText(f"Held: {car.brand} {car.model} (hold {entry.id})"))
        else:
            event.add("uid", f"maintenance-window-{entry.id}@dealership")
            event.add("summary", FeedText(f"Maintenance: {entry.note or 'workshop'} ({car.brand} {car.model})"))
        event.add("dtstamp", stamp)
        event.add("dtstart", entry.start_datetime)
        event.add("dtend", entry.end_datetime)
        event.add("categories", [{Booking: "Booking", Hold: "Hold"}.get(type(entry), "Maintenance")])
        calendar.add_component(event)
    return calendar.to_ical()


def feed(name, filters, **which):
    """The feed `name` of the bookings and windows of `which` (car_id=, dealer_id= or the whole
    fleet) in the period that `filters` ask for, with an ETag: a calendar program that polls gets
    304 Not Modified, decided before its entries are looked up, while nothing in it can have
    changed. DTSTAMP is today's midnight (UTC). More than MAX_FEED_EVENTS entries are a 422,
    counted before the calendar is made."""
    stamp = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    start, end = feed_period(filters, stamp)
    tag = entity_tag("feed", name, sorted(which.items()), start, end, stamp)
    unchanged = not_modified(tag)
    if unchanged is not None:
        return unchanged
    entries = store().read(Fleet.entries, start, end, **which)
    if len(entries) > MAX_FEED_EVENTS:
        narrower = "" if "car_id" in which else ", or the feed of one dealer (dealer_id) or one car"
        raise InvalidError("end_datetime", f"The feed would hold {len(entries):,} bookings and maintenance windows, "
                                           f"more than the {MAX_FEED_EVENTS:,} a feed carries: ask for a shorter "
                                           f"period{narrower}.")
    response = Response(ical(name, entries, stamp), mimetype="text/calendar", headers={"Cache-Control": "no-cache"})
    response.set_etag(tag)
    return response


@bp.get("/cars/<digits:car_id>/calendar.ics")
@api_doc("cars", query=FEED_QUERY, media="text/calendar")
def car_feed(car_id):
    """Subscribe to a car's calendar

    An iCalendar feed of the car's bookings and maintenance windows, from 30 days ago to 365 days
    ahead unless a period is given; no customer's name or e-mail.
    """
    car = store().fleet.car(car_id)
    return feed(f"{car.brand} {car.model} (car {car.id})", query(FEED_QUERY), car_id=car_id)


@bp.get("/calendar.ics")
@api_doc("cars", query=FLEET_FEED_QUERY, media="text/calendar", errors=[404])
def fleet_feed():
    """Subscribe to the fleet's calendar

    An iCalendar feed of every car's bookings and maintenance windows (or one dealer's), from 30 days
    ago to 365 days ahead unless a period is given; no customer's name or e-mail.
    """
    filters = query(FLEET_FEED_QUERY)
    dealer_id = filters.get("dealer_id")
    name = "Fleet" if dealer_id is None else store().fleet.dealer(dealer_id).name
    return feed(name, filters, dealer_id=dealer_id)


# ---------------------------------------------------------------------------------------------
# The OpenAPI document, made from the routes' own schemas, and the interactive docs
# ---------------------------------------------------------------------------------------------

API_DESCRIPTION = """A car dealership's inventory and booking service.

Date-times are RFC 3339. A value with an offset (`Z`, `+02:00`) is that instant; a value without one is
local time in the dealership's zone (`DEALERSHIP_TIMEZONE`, UTC unless set), and responses carry that
zone's offset. Booking intervals are half-open, `[start, end)`: a booking that ends at 10:00 and another
that starts at 10:00 on the same car do not overlap, while one second of overlap is a 409. `end_datetime`
must be after `start_datetime`, and a booking cannot start in the past. Every error is
`application/problem+json`. Every response carries `X-Request-ID`: the one the request sent, if it is 1 to
200 printable ASCII characters, else a new one; a problem's body repeats it as `request_id`, and the
service's log lines name it.

Retries and edits are safe. Every POST, PUT and PATCH takes an `Idempotency-Key`: the same request sent
again with the same key gets the first answer again (`Idempotent-Replayed: true`) and changes nothing.
Every single record answers with a strong `ETag` (its version): `If-None-Match` on GET gives 304 while it
is unchanged, and `If-Match` on PUT, PATCH and DELETE changes it only if it is still that version (else
412). A hold (**POST /api/v1/holds**) keeps a car's period for a few minutes while a customer books, and
**GET /api/v1/changes** follows every change in commit order.

Start with **POST /api/v1/cars**, then **POST /api/v1/bookings**: each opens ready to try with its example filled in: press Execute, and
the examples filled in create a car and book it for a week from now."""

ERROR_MEANINGS = {
    400: "The body is not valid JSON, or not a JSON object.",
    401: "Keys are in force (DEALERSHIP_API_KEY is set, or a key was made) and the request does not carry one "
         "as 'Authorization: Bearer <key>' (every write, and the reads of customers' data).",
    403: "The key sent is not of a role the operation admits, or not of the dealer of the car it acts on "
         "(`detail` says which role or dealer it needs).",
    404: "No such resource, or a car or dealer that the body names does not exist.",
    409: "A clash with the stored data (`detail` names what it clashes with), or a request with the same "
         "Idempotency-Key still being handled.",
    413: "The body is larger than DEALERSHIP_MAX_CONTENT_LENGTH.",
    415: "The body is not sent as application/json.",
    410: "Gone: a hold that has expired, or a change-feed cursor the log no longer reaches (`next` says where "
         "to follow on from once the collections are read again).",
    412: "If-Match names another version (ETag) of the record than the one stored: it changed since it was "
         "read. Nothing changed.",
    422: "A field or query parameter is invalid, missing or unknown, or an Idempotency-Key was used for another "
         "request; `errors` lists each.",
    429: "Too many refused API keys (or, with DEALERSHIP_RATE_LIMIT, requests) from this address; "
         "retry after `Retry-After`.",
    503: "The database refused the write (busy, read-only or full); nothing changed. Retry after `Retry-After`.",
}
# The operations in the order a newcomer needs them: a car must exist before it can be booked.
TAGS = {"cars": "The inventory: add, list, change and remove cars, see when one is busy or free, price a booking.",
        "bookings": "Book a car for a period, find the cars free for a period or the earliest free slot, move or "
                    "cancel a booking.",
        "maintenance": "Take a car out of service for a period: no booking can be made over it.",
        "holds": "Keep a car's period for a few minutes while a customer books, then turn it into a booking.",
        "changes": "Follow every change, in commit order, from a cursor.",
        "dealers": "The dealers that own the cars, and the turnaround their cars need between bookings.",
        "service": "Where to start."}
# What the example of a change (PUT/PATCH) shows: what a user would change first. A test loads
# every example through its schema, so a renamed field cannot leave one behind.
CHANGE_EXAMPLES = {"Car": lambda period: {"color": "Red", "daily_price": 69.9},
                   "Dealer": lambda period: {"turnaround_minutes": 60},
                   "Booking": lambda period: {"end_datetime": period["end_datetime"] + timedelta(days=1)}}
RESPONSE_HEADERS = {
    "Location": {"description": "The URL of the new resource.", "required": True, "schema": {"type": "string"}},
    "X-Total-Count": {"description": "The number of items before paging.", "required": True,
                      "schema": {"type": "integer", "minimum": 0}},
    "ETag": {"description": "The version of what was answered: send it back in If-None-Match to get 304 while "
                            "nothing changed, or (one record's) in If-Match to change or remove the record only "
                            "if nobody has since.", "required": True, "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "'true' when the answer is the one kept for the request's "
                                           "Idempotency-Key: the request was handled before, and nothing changed now.",
                            "schema": {"type": "string", "enum": ["true"]}},
    "Link": {"description": "With a page (always for bookings and slots, with `limit` for the others): RFC 8288 links "
                            "to the next and previous pages, with the same filters.",
             "schema": {"type": "string"}},
}
IDEMPOTENCY_PARAMETER = {
    "in": "header", "name": IDEMPOTENCY_HEADER, "required": False,
    "description": "Any 1 to 255 printable ASCII characters (a UUID, say: 5f2b8c1e-0c4a-4f7e-9d3b-2a6f1e8c9b70), "
                   "new for each request. The answer to a "
                   "request that succeeds is kept with its key for DEALERSHIP_IDEMPOTENCY_HOURS: the same request "
                   "sent again with the same key (a retry after a timeout) gets that answer again, with "
                   "`Idempotent-Replayed: true`, and changes nothing. The same key with another request is a 422; "
                   "while the first is still being handled, a 409. A refused request keeps nothing.",
    # No example: the docs page would fill the same one into every operation, and the second is a 422.
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": r"^[ -~]{1,255}$"}}
CONDITION_PARAMETERS = {
    "If-None-Match": {"in": "header", "name": "If-None-Match", "required": False,
                      "description": "The ETag of the version the client holds: 304 Not Modified while it is current.",
                      "schema": {"type": "string"}},
    "If-Match": {"in": "header", "name": "If-Match", "required": False,
                 "description": "The ETag of the version the change is meant for (or * for any): when the record is "
                                "at another version, 412 and nothing changes. Checked in the same step as the change.",
                 "schema": {"type": "string"}},
}
_PATH_ARGUMENT = re.compile(r"<(?:\w+:)?(\w+)>")
_PATH_TEMPLATE = re.compile(r"{(\w+)}")


def schema_name(schema):
    """Component names: Car for CarSchema, CarChanges for CarSchema(partial=True)."""
    cls = schema if isinstance(schema, type) else type(schema)
    name = cls.__name__.removesuffix("Schema")
    return name + "Changes" if getattr(schema, "partial", False) else name


METHOD_ORDER = ["post", "get", "put", "patch", "delete"]  # create, list or read, change, remove


def reading_order(doc, rule):
    """Where an operation stands in the docs: by tag (as TAGS lists them), the calendar feeds last,
    then by path."""
    return list(TAGS).index(doc["tag"]), doc["media"] is not None, rule


def example_period(zone):
    """The period every example uses: a week ahead of today, 09:00 to 09:00 two days later, in the
    dealership's zone (so it is never in the past and is written with the zone's offset)."""
    start = datetime.now(zone).replace(hour=9, minute=0, second=0, microsecond=0) + timedelta(days=7)
    return {"start_datetime": start, "end_datetime": start + timedelta(days=2)}


class Examples:
    """Examples that look like what the service says, made from the schemas it says it with: a
    request body from each field's own example, a response by dumping that through its schema."""

    def __init__(self, period):
        self.period = period
        car = {"id": 1} | self.body(CAR_SCHEMA)
        start, end = period["start_datetime"], period["end_datetime"]
        price = price_cents(car["daily_price"], start, end)
        booking = {"id": 1} | self.body(BOOKING_SCHEMA) | period | {"total_cents": price}
        workshop = {"id": 1, "car_id": 1, "note": "Brake check", "start_datetime": end + timedelta(days=1),
                    "end_datetime": end + timedelta(days=1, hours=4)}
        hold = {"id": 1, "car_id": 1, "expires_at": start - timedelta(days=7) + timedelta(minutes=DEFAULT_HOLD_MINUTES)} \
            | period
        self.clash = str(clash(Car(**car), 0, start, end, Booking(**booking), PRESENTATION.get().zone))
        self.responses = {
            CarSchema: CAR_SCHEMA.dump(car),
            BookingSchema: BOOKING_SCHEMA.dump(booking),
            DealerSchema: DEALER_SCHEMA.dump({"id": 1} | SEED_DEALER | {"turnaround_minutes": 60}),
            CalendarSchema: CALENDAR_SCHEMA.dump({
                "car_id": 1, "start_datetime": start - timedelta(days=1), "end_datetime": end + timedelta(days=2),
                "status": "available", "turnaround_minutes": 60, "available": False, "reason": self.clash,
                "busy": [booking],
                "maintenance": [workshop],
                "free": [{"start_datetime": start - timedelta(days=1), "end_datetime": start - timedelta(hours=1)},
                         {"start_datetime": end + timedelta(hours=1), "end_datetime": end + timedelta(hours=23)},
                         {"start_datetime": end + timedelta(days=1, hours=5),
                          "end_datetime": end + timedelta(days=2)}]}),
            MaintenanceWindowSchema: WINDOW_SCHEMA.dump(workshop),
            HoldSchema: HOLD_SCHEMA.dump(hold),
            ChangesSchema: CHANGES_SCHEMA.dump({"changes": [
                {"cursor": "41", "type": "car", "id": 1, "action": "created", "at": start - timedelta(days=7),
                 "record": CAR_SCHEMA.dump(car)},
                {"cursor": "42", "type": "booking", "id": 1, "action": "created", "at": start - timedelta(days=7),
                 "record": BOOKING_SCHEMA.dump(booking)}], "next": "42"}),
            QuoteSchema: QUOTE_SCHEMA.dump({"car_id": 1, "days": rental_days(start, end), "total_cents": price,
                                            "daily_price": car["daily_price"], "available": True, "reason": None}
                                           | period),
            OfferSchema: OFFER_SCHEMA.dump({"car_id": 1, "total_cents": price} | period),
            HistorySchema: HISTORY_SCHEMA.dump({
                "at": start - timedelta(days=7), "action": "changed", "key": "3", "request_id": "8f14e45fceea167a",
                "fields_": {"end_datetime": {"before": BOOKING_SCHEMA.dump(booking)["end_datetime"],
                                             "after": BOOKING_SCHEMA.dump(booking | {"end_datetime": end + timedelta(
                                                 hours=2)})["end_datetime"]}}}),
            IndexSchema: INDEX_SCHEMA.dump({"name": "Dealership API", "version": API_VERSION, "links": {
                "cars": f"{API_PREFIX}/cars", "bookings": f"{API_PREFIX}/bookings"}}),
        }
        vin_error = CAR_SCHEMA.fields["vin"].error
        request_id = {"request_id": PROBLEM_SCHEMA.fields["request_id"].metadata["example"]}
        self.problems = {code: {"title": title, "status": code, "detail": detail} | extra | request_id
                         for code, title, detail, extra in [
            (400, "Bad Request", "The body is not valid JSON.", {}),
            (401, "Unauthorized", "No API key was sent: this request changes data, so send "
                                  "'Authorization: Bearer <API key>'.", {}),
            (403, "Forbidden", str(ForbiddenError(f"{Access('3', 'staff', 2)} may put cars only at dealer 2, not at "
                                                  "dealer 1: this needs an admin key or a staff key of dealer 1.")), {}),
            (404, "Not Found", "There is no car with id 7.", {}),
            (409, "Conflict", self.clash, {}),
            (410, "Gone", "Hold 1 expired at " + format_instant(hold["expires_at"], PRESENTATION.get().zone) + ": its "
                          "period is free again to anyone. Check that it is still free and book it, or place a new "
                          "hold.", {}),
            (412, "Precondition Failed", "If-Match names another version of this record than the one stored (ETag "
                                         "\"2.5f0e1c3a\"): it changed since it was read, and nothing was changed. Read "
                                         "it again (GET), check the change still makes sense, and send it with the "
                                         "new ETag.", {}),
            (413, "Request Entity Too Large", "The body is larger than the limit of 1048576 bytes.", {}),
            (415, "Unsupported Media Type", "Send the body as JSON with 'Content-Type: application/json'.", {}),
            (422, "Unprocessable Content", "Invalid input: vin.", {"errors": {"vin": [vin_error]}}),
            (429, "Too Many Requests", "Too many refused API keys from this address: wait before trying again.", {}),
            (503, "Service Unavailable", "The database is busy: another process held it for longer than "
                                         "DEALERSHIP_BUSY_TIMEOUT. Nothing was changed; try again.", {}),
        ]}

    def body(self, schema):
        """A request body for `schema`, each value from its field (a date-time from the period)."""
        if schema.partial:
            values = CHANGE_EXAMPLES[schema_name(type(schema))](self.period)
        else:
            values = {name: self.period[name] if isinstance(field, Instant) else field.metadata["example"]
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
    if method in KEYED_METHODS:
        op["parameters"].append(IDEMPOTENCY_PARAMETER)
        errors.update((400, 409, 422))
    if doc["versioned"] and method == "GET":
        op["parameters"].append(CONDITION_PARAMETERS["If-None-Match"])
        op["responses"]["304"] = {"description": "Not Modified: the record is still the version If-None-Match names."}
    elif doc["versioned"]:
        op["parameters"].append(CONDITION_PARAMETERS["If-Match"])
        errors.add(412)
    if limited:
        errors.add(429)
    if needs_key(method, view):
        errors.update((401, 403, 429))
        roles = doc["roles"]
        op["x-roles"] = list(roles)
        op["description"] = (op.get("description", "") + "\n\n" + f"Keys: {' or '.join(roles)}" + (
            "; a staff key only for its dealer's cars" if "staff" in roles else "") + (
            "; a booking key only for what it made" if "booking" in roles and doc["tag"] != "cars" else "") + ".").strip()
        if secured:
            op["security"] = [{"bearer": []}]
    success = {"description": summary, "headers": {name: RESPONSE_HEADERS[name] for name in doc["headers"]}}
    if doc["versioned"] and doc["returns"] is not None:
        success["headers"]["ETag"] = RESPONSE_HEADERS["ETag"]
    if method in KEYED_METHODS:
        success["headers"]["Idempotent-Replayed"] = RESPONSE_HEADERS["Idempotent-Replayed"]
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


def openapi_document(app):
    """The OpenAPI 3 document of the service's routes as mounted on `app` (in a request to it: the
    examples are written in its dealership's time zone)."""
    spec = APISpec(title="Dealership API", version=API_VERSION, openapi_version="3.0.3",
                   info={"description": API_DESCRIPTION},
                   plugins=[MarshmallowPlugin(schema_name_resolver=schema_name)])
    for name, description in TAGS.items():
        spec.tag({"name": name, "description": description})
    spec.components.schema("Problem", schema=ProblemSchema)
    secured = bool(app.config["DEALERSHIP_API_KEY"]) or app.extensions[EXTENSION].keys_made()
    if secured:
        spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    examples = Examples(example_period(PRESENTATION.get().zone))
    paths = {}
    for rule in sorted((rule for rule in app.url_map.iter_rules() if rule.endpoint.partition(".")[0] == bp.name),
                       key=lambda rule: reading_order(app.view_functions[rule.endpoint].api_doc, rule.rule)):
        view = app.view_functions[rule.endpoint]
        methods = sorted(rule.methods - {"HEAD", "OPTIONS"})
        paths.setdefault(_PATH_ARGUMENT.sub(r"{\1}", rule.rule), {}).update(
            {method.lower(): operation(view, method, rule, secured, len(methods) > 1, examples,
                                       bool(app.config["DEALERSHIP_RATE_LIMIT"]))
             for method in methods})
    add_links(paths)
    for path, operations in paths.items():
        spec.path(path=path, operations=dict(sorted(operations.items(), key=lambda item: METHOD_ORDER.index(item[0]))))
    document = spec.to_dict()
    period = examples.period
    moments = period | {"after": period["start_datetime"], "before": period["start_datetime"] + timedelta(days=30)}
    for operations in document["paths"].values():  # a query parameter's example beside its description
        for op in operations.values():
            for parameter in op["parameters"]:
                if parameter["in"] == "query":
                    moment = moments.get(parameter["name"])
                    example = parameter["schema"].pop("example", None)
                    parameter["example"] = example if moment is None else moment.isoformat()
    return document


docs_bp = Blueprint(DOCS, __name__)


@docs_bp.get("/openapi.json")
def openapi_json():
    """The OpenAPI document, made once a day per app (its examples are a week ahead of today), and
    again once keys come in force (its operations then declare bearer auth)."""
    cache = current_app.extensions.setdefault("dealership_openapi", {})
    today = (datetime.now(timezone.utc).date(), current_app.extensions[EXTENSION].keys_made())
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
handle_errors(board_bp)
observe(board_bp)
BOARD_DAYS = (7, 14, 28)
BOARD_ROWS = 100  # cars on one page of the board; the others on the pages after it
BOARD_MAX_BARS = 5000  # bookings and windows drawn on one page: what it costs to make grows with them
FIRST_BOARD_DAY, LAST_BOARD_DAY = date(1971, 1, 1), date(9998, 12, 1)


class Day(fields.String):
    """A calendar date written YYYY-MM-DD, from FIRST_BOARD_DAY to LAST_BOARD_DAY."""

    def _deserialize(self, value, attr, data, **kwargs):
        value = super()._deserialize(value, attr, data, **kwargs)
        try:
            day = date.fromisoformat(value) if re.fullmatch(r"\d{4}-\d\d-\d\d", value) else None
        except ValueError:
            day = None
        if day is None or not FIRST_BOARD_DAY <= day <= LAST_BOARD_DAY:
            raise ValidationError(f"Must be a date written YYYY-MM-DD (2035-06-04), from {FIRST_BOARD_DAY} to "
                                  f"{LAST_BOARD_DAY}.")
        return day


class BoardQuery(Schema):
    start = Day(metadata=about("The first day shown; the Monday of this week when left out."))
    days = Count(load_default=14, validate=validate.OneOf(BOARD_DAYS), metadata=about("7, 14 or 28 days."))
    dealer_id = Count(validate=validate.Range(min=1), metadata=about("Only this dealer's cars."))
    page = Count(load_default=1, validate=validate.Range(min=1), metadata=about(
        f"Which {BOARD_ROWS} cars: page 1 has the first, by dealer and then by id."))


BOARD_QUERY = BoardQuery()


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


def bar_text(entry):
    """What the board says of an entry whatever the period: (kind, its attributes as HTML, its label)."""
    zone, currency = PRESENTATION.get().zone, PRESENTATION.get().currency
    start, end = format_instant(entry.start_datetime, zone), format_instant(entry.end_datetime, zone)
    shown = f"{start[:16].replace('T', ' ')} to {end[:16].replace('T', ' ')}"
    if type(entry) is Booking:
        kind, label = "booking", str(entry.id)
        title = f"Booking {entry.id}: {shown}, {entry.total_cents / 100:.2f} {currency}"
    elif type(entry) is Hold:
        until = format_instant(entry.expires_at, zone)[11:16]
        kind, label = "hold", "Held"
        title = f"Hold {entry.id}: {shown}, held until {until} for a customer who is booking"
    else:
        kind, label = "window", entry.note or "Maintenance"
        title = f"Maintenance window {entry.id}{': ' + entry.note if entry.note else ''}: {shown}"
    attributes = (f' data-{kind}-id="{entry.id}" data-start="{start}"'
                  f' data-end="{end}" title="{escape(title)}" aria-label="{escape(title)}"')
    return kind, attributes, escape(label)


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
            f' style="left:{left:.4f}%;width:{width:.4f}%"><span class="label">{"&#9664; " if cut_start else ""}{label}'
            f'{" &#9654;" if cut_end else ""}</span></div>')
    if kind == "booking" and pad and end < period.last:
        left, width = period.place(end, end + pad)
        html = f'<div class="tail" aria-hidden="true" style="left:{left}%;width:{width}%"></div>' + html
    return html


def board_page(service, period, dealer_id, page):
    """One page of the board's rows: BOARD_ROWS cars (a dealer without cars takes one for its heading),
    by dealer and then by id, as [(dealer, [(car, its entries in the period)])], and how many pages
    there are. A page past the last is a 404; one with more than BOARD_MAX_BARS entries a 422,
    counted before any is drawn."""
    rows = []
    for dealer, cars in service.read(Fleet.board_rows, period.begin, period.end, dealer_id):
        rows += [(dealer, car) for car in cars] or [(dealer, None)]
    pages = max(1, -(-len(rows) // BOARD_ROWS))
    if page > pages:
        raise NotFoundError(f"The board has {plural(pages, 'page')} of {BOARD_ROWS} cars: there is no page {page}.")
    rows = rows[(page - 1) * BOARD_ROWS:page * BOARD_ROWS]
    bars = sum(len(car[1]) for _, car in rows if car is not None)
    if bars > BOARD_MAX_BARS:
        raise InvalidError("days", f"This page of the board would draw {bars:,} bookings and maintenance windows, more "
                                   f"than the {BOARD_MAX_BARS:,} it draws: show fewer days, or one dealer.")
    groups = {}
    for dealer, car in rows:
        groups.setdefault(dealer.id, (dealer, []))[1].extend([car] if car is not None else [])
    return list(groups.values()), pages


BOARD_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fleet board: {{ period }}</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1rem; color: #1b1b1b; }
  nav a { margin-right: .8rem; }
  .board { margin-top: 1rem; min-width: max(60rem, calc(17rem + {{ days }} * 2.75rem)); position: relative; }
  .grid { position: absolute; top: 0; bottom: 0; left: 17rem; right: 0; pointer-events: none; }
  .row { display: flex; border-bottom: 1px solid #ddd; min-height: 2rem; }
  .car { flex: 0 0 17rem; box-sizing: border-box; padding: .3rem .5rem; overflow-wrap: anywhere; }
  .vin, .status { white-space: nowrap; }
  .vin { color: #666; font-family: monospace; }
  .status { font-size: 85%; color: #666; }
  .lane { position: relative; flex: 1; overflow-x: clip; }
  .day, .cell { position: absolute; top: 0; bottom: 0; border-left: 1px solid rgba(0, 0, 0, .08); box-sizing: border-box; }
  .cell.today { background: rgba(255, 196, 0, .15); }
  .head { min-height: calc(2.8em + .6rem); }
  .head .day { padding: .3rem .25rem; font-size: 13px; font-weight: 600; overflow: hidden; }
  .today { background: #fff6d5; }
  .bar { position: absolute; top: .3rem; bottom: .3rem; box-sizing: border-box; border-radius: 3px;
         font-size: 12px; line-height: 1.4rem; white-space: nowrap; container-type: inline-size; }
  .label { display: inline-block; vertical-align: top; box-sizing: border-box; max-width: 100%; padding: 0 .3rem;
          overflow: hidden; text-overflow: ellipsis; }
  /* a window's note, and the label of a bar too narrow for any text, are tags that may run on past
     their bar over the free lane (a later bar covers them); title and aria-label keep the whole text */
  .window .label { max-width: max(100%, 12rem); margin: .2rem 0 0 .1rem; padding: 0 .2rem; line-height: 1rem;
                   background: #fff; border-radius: 2px; }
  @container (max-width: 1.8rem) { .bar .label { position: absolute; left: 100%; top: .2rem; max-width: 12rem; margin: 0 0 0 2px;
    padding: 0 .2rem; line-height: calc(1rem - 2px); border: 1px solid #999; border-radius: 2px; background: #fff; color: #1b1b1b; } }
  .booking { background: #2f6fb2; color: #fff; }
  .window { background: repeating-linear-gradient(45deg, #c0392b 0 6px, #f3c6c0 6px 12px); color: #000; }
  .hold { background: #fff; color: #1f4f82; border: 2px dashed #2f6fb2; line-height: calc(1.4rem - 4px); }
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
{% if pages > 1 %}<nav class="pages">Cars, page {{ page }} of {{ pages }}:
  {% if earlier %}<a href="{{ earlier }}">&larr; Previous {{ rows }} cars</a>{% endif %}
  {% if later %}<a href="{{ later }}">Next {{ rows }} cars &rarr;</a>{% endif %}
</nav>{% endif %}
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


@board_bp.get("/board")
def board():
    """The fleet at a glance: one row per car, grouped by dealer, one column per day; bookings as bars
    placed by their times, maintenance windows hatched, the turnaround after each booking as a light
    tail, cars in maintenance status greyed; BOARD_ROWS cars a page. No customer's name or e-mail:
    the page needs no key. With an ETag: a reload answers 304, decided before anything is drawn,
    while nothing on the page can have changed."""
    service = store()
    service.sync()
    zone = service.zone
    filters = query(BOARD_QUERY)
    today = datetime.now(zone).date()
    first = filters.get("start", today - timedelta(days=today.weekday()))
    days, dealer_id, page = filters["days"], filters.get("dealer_id"), filters["page"]
    if dealer_id is not None:
        service.fleet.dealer(dealer_id)
    tag = entity_tag("board", today, first, days, dealer_id, page, request.script_root, request.path,
                     DOCS in current_app.extensions)
    unchanged = not_modified(tag)
    if unchanged is not None:
        return unchanged
    midnights = [datetime.combine(first + timedelta(days=n), dt_time(0), zone).astimezone(timezone.utc)
                 for n in range(days + 1)]
    period = Period(midnights[0], midnights[-1])
    columns = [{"label": (first + timedelta(days=n)).strftime("%a %d"), "today": first + timedelta(days=n) == today,
                "place": period.place(micros(midnights[n]), micros(midnights[n + 1]))} for n in range(days)]
    texts = current_app.extensions.setdefault(BOARD, {})
    if len(texts) > BOARD_TEXTS_KEPT:
        texts.clear()
    shown, pages = board_page(service, period, dealer_id, page)
    groups = []
    for dealer, cars in shown:
        pad = dealer.turnaround_minutes * MINUTE
        rows = [{"car": car, "out": car.status != "available",
                 "bars": Markup("".join(bar_html(entry, period, pad, texts) for entry in entries))}
                for car, entries in cars]
        groups.append({"dealer": dealer, "rows": rows})
    link = functools.partial(url_for, f"{BOARD}.board", days=days)
    dealer_arg = {} if dealer_id is None else {"dealer_id": dealer_id}
    kept = dealer_arg | ({} if page == 1 else {"page": page})  # moving through the days keeps the page of cars
    template = current_app.extensions.get(BOARD_TEMPLATE_KEY)
    if template is None:  # compiled once per app (render_template_string would compile it each time)
        template = current_app.extensions[BOARD_TEMPLATE_KEY] = current_app.jinja_env.from_string(BOARD_TEMPLATE)
    response = Response(render_template(
        template, groups=groups, columns=columns, days=days,
        period=f"{first:%a %d %b %Y} to {first + timedelta(days=days - 1):%a %d %b %Y}", zone=zone,
        previous=link(start=(first - timedelta(days=days)).isoformat(), **kept),
        next=link(start=(first + timedelta(days=days)).isoformat(), **kept),
        today=link(**kept), all_dealers=link(start=first.isoformat()),
        docs=docs_url() if DOCS in current_app.extensions else None,
        dealers=[(dealer, link(start=first.isoformat(), dealer_id=dealer.id)) for dealer in service.fleet.dealers.values()],
        dealer_id=dealer_id, page=page, pages=pages, rows=BOARD_ROWS,
        earlier=link(start=first.isoformat(), **dealer_arg, **({"page": page - 1} if page > 2 else {})) if page > 1 else None,
        later=link(start=first.isoformat(), **dealer_arg, page=page + 1) if page < pages else None), mimetype="text/html")
    response.headers["Cache-Control"] = "no-cache"
    response.set_etag(tag)
    return response


# ---------------------------------------------------------------------------------------------
# Logs: one line per event, each starting with its time (ISO 8601, with offset), level, process id
# and logger, and the id of the request it was written for; ids and times only, never a customer's
# name or e-mail. As text, or as one JSON object per line for log shippers.
# ---------------------------------------------------------------------------------------------


class LogTime:
    """When a record was made, in the machine's local time: 2035-01-15T10:00:00.123+01:00 (the date,
    time and offset worked out once a second)."""

    def __init__(self):
        self.second, self.parts = None, None

    def __call__(self, record):
        second, micros = divmod(round(record.created * 1_000_000), 1_000_000)  # as datetime rounds it
        if second != self.second:
            stamp = datetime.fromtimestamp(second).astimezone().isoformat()  # 2035-01-15T10:00:00+01:00
            self.second, self.parts = second, (stamp[:19], stamp[19:])
        return f"{self.parts[0]}.{micros // 1000:03d}{self.parts[1]}"


class RequestIdFilter(logging.Filter):
    """Gives each record `request_id`: the id of the request being handled in this thread, or None."""

    def filter(self, record):
        if not hasattr(record, "request_id"):
            record.request_id = g.get("request_id") if has_request_context() else None
        return True


class LogFormatter(logging.Formatter):
    """The service's log line: `2035-01-15T10:00:00.123+01:00 INFO 4242 dealership [request id]: ...`."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(process)d %(name)s%(request_tag)s: %(message)s")
        self.clock = LogTime()

    def format(self, record):
        request_id = getattr(record, "request_id", None)
        record.request_tag = f" [{request_id}]" if request_id else ""
        return super().format(record)

    def formatTime(self, record, datefmt=None):
        return self.clock(record)


class JsonLogFormatter(pythonjsonlogger.json.JsonFormatter):
    """One JSON object per line: time, level, logger, pid, message, request_id, then the event's own
    fields (those given as `extra`) and any exception's traceback."""

    def __init__(self):
        super().__init__("{asctime}{levelname}{name}{process}{message}{request_id}", style="{",
                         rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"})
        self.clock = LogTime()

    def formatTime(self, record, datefmt=None):
        return self.clock(record)


LOG_FORMATS = {"text": LogFormatter, "json": JsonLogFormatter}
LOG_BATCH = 1000  # lines in one write to stderr at most
LOG_PAUSE = 0.01  # seconds between two writes, unless a whole batch is waiting: what kill -9 may cost


class LogWriter(logging.Handler):
    """serve's handler: writes the lines to stderr from a thread of its own, what has gathered in up
    to LOG_PAUSE seconds in one write. A thread that wrote its line itself would hold the handler's
    lock while the write gives up the GIL, and every other request thread that logs would queue
    behind it until it got the GIL back: with a line per request, that cost half the requests. A
    record is formatted by the writing thread (its arguments are values that do not change); what is
    still queued at exit is written then (serve always exits so, but for kill -9)."""

    def __init__(self):
        super().__init__()
        self.records = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write, name="dealership-log", daemon=True)
        self.writer.start()
        atexit.register(self.close)

    def emit(self, record):
        self.records.put(record)

    def _write(self):
        while True:
            batch = [self.records.get()]
            while batch[-1] is not None and len(batch) < LOG_BATCH:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            lines = []
            for record in batch:
                if record is not None:
                    try:
                        lines.append(self.format(record) + "\n")
                    except Exception:
                        self.handleError(record)
            try:
                sys.stderr.write("".join(lines))
                sys.stderr.flush()
            except (OSError, ValueError):  # stderr closed: nothing to be done
                pass
            if batch[-1] is None:
                return
            if len(batch) < LOG_BATCH:
                time.sleep(LOG_PAUSE)  # let lines gather: a thread woken for every line costs the others the GIL

    def close(self):
        if self.writer.is_alive():
            self.records.put(None)
            self.writer.join(timeout=5)
        super().close()


log.addFilter(RequestIdFilter())  # so that a host app's own handlers see request_id too
access_log.addFilter(RequestIdFilter())


def configure_logging(form="text", writer=False):
    """Give the root logger the service's lines on stderr in the form asked for (through a LogWriter
    if `writer`: serve's workers), unless logging is set up already by someone else (a host app's own
    format, or a test's capture, is kept), and let the service's INFO lines through."""
    root = logging.getLogger()
    ours = next((handler for handler in root.handlers if getattr(handler, "dealership", False)), None)
    if ours is None and root.handlers:
        pass
    elif ours is None or (writer and not isinstance(ours, LogWriter)):
        handler = LogWriter() if writer else logging.StreamHandler()
        handler.dealership = True
        handler.setFormatter(LOG_FORMATS[form]())
        handler.addFilter(RequestIdFilter())  # in the thread that logs: the request's id
        if ours is not None:
            root.removeHandler(ours)
        root.addHandler(handler)
        # what no line of the service shows, left out of every record (logging's own advice for speed)
        logging.logThreads = logging.logMultiprocessing = False
    else:
        ours.setFormatter(LOG_FORMATS[form]())
    if log.level == logging.NOTSET:
        log.setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------
# CLI commands, registered by init_app: serve (production) and backup
# ---------------------------------------------------------------------------------------------

SERVE_CONNECTIONS = 1000  # open connections waitress accepts: far above its threads, so idle ones lock nobody out
SERVE_IDLE_SECONDS = 30  # a connection that sends nothing for this long is closed; and the longest a stop waits
SERVE_WORKER = "DEALERSHIP_SERVE_WORKER"  # set in the environment of serve's worker processes
# Where serve's workers keep their metrics for /metrics to sum: prometheus_client reads it at import
# (so it is set for the workers, which are new processes). serve makes a folder of its own unless the
# operator names one, which must then be emptied before each start.
METRICS_FOLDER = "PROMETHEUS_MULTIPROC_DIR"
# The most of its response a connection holds in waitress's buffers: past it the app thread waits
# for the client to read, so a client that does not read costs neither memory nor disk beyond it.
SERVE_BUFFER = 1024 * 1024
SERVE_PIECE = 64 * 1024  # a response is handed to waitress in pieces of at most this: see Pieces


class Pieces:
    """A WSGI response as pieces of at most SERVE_PIECE bytes. waitress checks its buffer's bound
    before each write, not within one: a body written whole, as Flask writes one, would be buffered
    whole (and, past waitress's outbuf_overflow, written to a temporary file)."""

    def __init__(self, app_iter):
        self.app_iter = app_iter

    def __iter__(self):
        for chunk in self.app_iter:
            for start in range(0, len(chunk), SERVE_PIECE):
                yield chunk[start:start + SERVE_PIECE]

    def close(self):  # WSGI: the server closes what the app returned, which may need it (Flask does)
        close = getattr(self.app_iter, "close", None)
        if close is not None:
            close()


def in_pieces(app):
    """`app`, its responses handed on in Pieces; a file sent through wsgi.file_wrapper stays as it is
    (waitress reads it from the file as the client takes it)."""
    def wsgi(environ, start_response):
        app_iter = app(environ, start_response)
        wrapper = environ.get("wsgi.file_wrapper")
        if isinstance(wrapper, type) and isinstance(app_iter, wrapper):
            return app_iter
        return Pieces(app_iter)
    return wsgi


def path_as_sent(app):
    """waitress drops extra slashes at the start of a path (a request for //api/v1/cars reaches the app
    as /api/v1/cars): put them back from the request line, so that under serve a URL means what it
    means under any other server."""
    def restore(environ, start_response):
        sent = environ.get("REQUEST_URI", "")
        path = unquote_to_bytes(sent.partition("?")[0] if sent.startswith("/") else urlsplit(sent).path)
        extra = len(path) - len(path.lstrip(b"/")) - 1
        if extra > 0:
            environ["PATH_INFO"] = "/" * extra + environ["PATH_INFO"]
        return app(environ, start_response)
    return restore


class WaitressServer:
    """The one place that touches waitress: its public create_server(), and, for a stop that
    finishes the requests in flight (which waitress's own serve() does not do), its event loop and
    channels. Those are internals of the version pinned in requirements.txt; a new version of
    waitress must pass the stop tests before the pin moves."""

    def __init__(self, app, listener, threads):
        import waitress
        # outbuf_high_watermark: past it the app thread waits for the client to read. A buffer then
        # holds at most SERVE_BUFFER and a piece, below outbuf_overflow: none is ever spooled to disk.
        # waitress removes X-Forwarded-* unless it trusts the peer itself; with DEALERSHIP_PROXIES the app's
        # ProxyFix (create_app) is the one judge of which proxies to trust, so waitress passes them on as sent.
        self.server = waitress.create_server(in_pieces(path_as_sent(app)), sockets=[listener], threads=threads,
                                             ident="dealership",
                                             max_request_body_size=app.config["DEALERSHIP_MAX_CONTENT_LENGTH"],
                                             connection_limit=SERVE_CONNECTIONS, channel_timeout=SERVE_IDLE_SECONDS,
                                             outbuf_high_watermark=SERVE_BUFFER, outbuf_overflow=2 * SERVE_BUFFER,
                                             clear_untrusted_proxy_headers=not app.config["DEALERSHIP_PROXIES"])
        self.server.print_listen("Serving on http://{}:{}")
        self.next_check = 0

    def poll(self, timeout, count=1):
        """Serve what is ready, waiting up to `timeout` seconds for something to be; then close the
        connections whose client has stopped reading."""
        from waitress.wasyncore import loop
        loop(timeout=timeout, map=self.server._map, use_poll=True, count=count)  # internal: the channel map
        self.close_stalled()

    def close_stalled(self):
        """Close each connection that has output waiting and has taken none of it for SERVE_IDLE_SECONDS
        (checked once a second). waitress's own timeout passes over a connection whose request is still
        running, and closes the others only once their socket can be written to: a client that stops
        reading would keep its buffer, and the app thread that waits for it, for ever."""
        now = time.time()  # waitress's clock for last_activity
        if now < self.next_check:
            return
        self.next_check = now + 1
        for channel in list(self.server.active_channels.values()):  # internal: the open connections
            if channel.total_outbufs_len and channel.last_activity < now - SERVE_IDLE_SECONDS:
                channel.handle_close()  # wakes the app thread waiting on it: its write then fails

    def finish_in_flight(self, seconds):
        """Take no new connection; let each open one finish what it was sent, closing the idle ones, for
        up to `seconds`; then stop the worker threads."""
        from waitress.channel import HTTPChannel
        from waitress.wasyncore import dispatcher
        dispatcher.close(self.server)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            busy = False
            for channel in list(self.server._map.values()):
                if isinstance(channel, HTTPChannel):  # internal: a channel's queue and output buffers
                    if channel.requests or channel.request is not None or channel.total_outbufs_len:
                        busy = True
                    else:
                        channel.will_close = True
            if not busy:
                break
            self.poll(timeout=0.05)
        self.poll(timeout=0.05, count=2)  # closes the channels just marked
        self.server.task_dispatcher.shutdown()  # internal: the worker threads


def serve_worker(app, listener, threads):
    """One waitress process on `listener` until SIGTERM or SIGINT, then the requests in flight finished.
    The access log is on unless DEALERSHIP_ACCESS_LOG turns it off."""
    configure_logging(app.config["DEALERSHIP_LOG_FORMAT"], writer=True)
    if app.config["DEALERSHIP_ACCESS_LOG"] is None:
        app.config["DEALERSHIP_ACCESS_LOG"] = True
    logging.getLogger("waitress").setLevel(logging.INFO)  # "Serving on ..."
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    server = WaitressServer(app, listener, threads)
    stopping, parent = [], os.getppid()
    for sign in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sign, lambda *_: stopping.append(True))
    while not stopping:
        server.poll(timeout=1.0)
        if os.getppid() != parent:  # its supervisor is gone (kill -9): go with it, as it would have
            logging.shutdown()  # what is still to be written
            os._exit(1)
    server.finish_in_flight(SERVE_IDLE_SECONDS)
    log.info("stopped: requests in flight finished")


# A worker that exits this soon after it was started did not start (a file it cannot open, a broken
# setting): it is started again after a pause that doubles each time, and after several such starts
# in a row the supervisor stops, with gunicorn's exit code for a worker that failed to boot, so that a
# process manager can tell "will not start" from a crash.
WORKER_START_SECONDS = 10
FIRST_RESTART_PAUSE, MAX_RESTART_PAUSE = 0.25, 10.0  # seconds
MAX_FAILED_STARTS = 5
FAILED_START_EXIT = 3


class WorkerSlot:
    """One of serve's worker processes, and whoever replaces it: when it was started, its failed
    starts in a row, and when the next one is due (None while one runs)."""

    def __init__(self, number, start, ended):
        self.number, self.start, self.ended, self.failures, self.due = number, start, ended, 0, None
        self.process, self.started = start(), time.monotonic()

    def tend(self):
        """Start the next worker if one is due; notice if this one exited. False once the slot has
        failed MAX_FAILED_STARTS starts in a row."""
        now = time.monotonic()
        if self.process is None:
            if now >= self.due:
                self.process, self.started, self.due = self.start(), now, None
            return True
        if self.process.poll() is None:
            return True
        pid, code, lived = self.process.pid, self.process.returncode, now - self.started
        self.ended(pid)
        if lived >= WORKER_START_SECONDS:
            self.failures = 0
            log.error("worker %d exited with %s; starting another", pid, code)
            self.process, self.started = self.start(), now
            return True
        self.process, self.failures = None, self.failures + 1
        if self.failures >= MAX_FAILED_STARTS:
            return False
        pause = min(FIRST_RESTART_PAUSE * 2 ** (self.failures - 1), MAX_RESTART_PAUSE)
        log.error("worker %d exited with %s %.1f s after it was started: failed start %d of %d in a row in slot %d; "
                  "starting another in %g s", pid, code, lived, self.failures, MAX_FAILED_STARTS, self.number, pause)
        self.due = now + pause
        return True


def supervise(listener, workers, threads):
    """Keep `workers` processes serving `listener` (each `flask ... serve` on the inherited socket),
    start a new one if one dies (after a growing pause if it died at start), and on SIGTERM or SIGINT
    pass the signal on and wait for them. Stops, with FAILED_START_EXIT, when workers cannot start."""
    info = click.get_current_context().find_object(ScriptInfo)
    command = [sys.executable, "-m", "flask"] + (["--app", info.app_import_path] if info and info.app_import_path else []) + \
        ["serve", "--threads", str(threads), "--socket-fd", str(listener.fileno())]
    host, port = listener.getsockname()[:2]
    log.info("serving http://%s:%d with %d worker processes", host, port, workers)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))

    metrics = os.environ.get(METRICS_FOLDER) or tempfile.mkdtemp(prefix="dealership-metrics-")

    def start():
        return subprocess.Popen(command, pass_fds=[listener.fileno()],
                                env=os.environ | {SERVE_WORKER: "1", METRICS_FOLDER: metrics})

    def ended(pid):  # its counts stay (they happened); its gauges go
        prometheus_client.multiprocess.mark_process_dead(pid, metrics)

    slots = [WorkerSlot(n + 1, start, ended) for n in range(workers)]
    failed = None
    while not stopping and failed is None:
        time.sleep(0.2)
        for slot in slots:
            if not stopping and failed is None and not slot.tend():
                failed = slot
    if failed is not None:
        log.error("workers cannot start: slot %d failed %d starts in a row, each exiting within %d s (the worker's "
                  "own lines above say why); stopping with exit code %d", failed.number, MAX_FAILED_STARTS,
                  WORKER_START_SECONDS, FAILED_START_EXIT)
    children = [slot.process for slot in slots if slot.process is not None]
    for child in children:
        child.send_signal(signal.SIGTERM)
    listener.close()  # the workers close theirs: then the port takes no new connection
    for child in children:
        try:
            child.wait(timeout=SERVE_IDLE_SECONDS + 5)
        except subprocess.TimeoutExpired:
            child.kill()
    if metrics != os.environ.get(METRICS_FOLDER):
        shutil.rmtree(metrics, ignore_errors=True)
    log.info("stopped: %d workers", workers)
    if failed is not None:
        click.get_current_context().exit(FAILED_START_EXIT)


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
    if isinstance(store().engine, PostgresEngine) and threads > app.config["DEALERSHIP_POOL_SIZE"]:
        log.warning("--threads %d is more than DEALERSHIP_POOL_SIZE=%d: threads will wait for a connection to "
                    "PostgreSQL; set DEALERSHIP_POOL_SIZE=%d", threads, app.config["DEALERSHIP_POOL_SIZE"], threads)
    memory = not store().engine.shared
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


@click.command("backup")
@click.argument("path", type=click.Path(dir_okay=False, writable=True))
@with_appcontext
def backup_command(path):
    """Copy the service's database to PATH, consistently, while the service keeps running."""
    engine = store().engine
    if not engine.shared:
        raise click.ClickException("DEALERSHIP_DATABASE is ':memory:': there is no file to back up.")
    try:
        counts = engine.backup(path)
    except (engine.Error, OSError) as error:
        raise click.ClickException(f"Could not back up {engine.name} to {path}: {error}") from None
    click.echo(f"Backed up {engine.name} to {path}: {plural(counts['dealers'], 'dealer')}, "
               f"{plural(counts['cars'], 'car')}, {plural(counts['bookings'], 'booking')}, "
               f"{plural(counts['maintenance_windows'], 'maintenance window')}.")


@click.group("keys")
def keys_command():
    """Make, list and revoke API keys (kept in the database, as a hash of each)."""


def key_note(note):
    """A key's note as given, if `keys list` can show it on one line."""
    if len(note) > MAX_NAME or re.search(f"[{CONTROLS}]", note) or LONE_SURROGATE.search(note):
        raise click.BadParameter(f"at most {MAX_NAME} characters, with no tab, newline or other control character.")
    return note


@keys_command.command("add")
@click.option("--role", required=True, type=click.Choice(ROLES),
              help="admin: everything; staff: one dealer's cars and bookings (--dealer); booking: make bookings "
                   "and holds, and read, change or cancel its own.")
@click.option("--dealer", "dealer_id", type=click.IntRange(min=1), help="The dealer of a staff key (only for staff).")
@click.option("--note", default="", callback=lambda ctx, param, value: key_note(value),
              help="What the key is for, shown by `keys list`: at most 200 characters, no tab or newline.")
@with_appcontext
def keys_add_command(role, dealer_id, note):
    """Make a key and print it, once: only a hash of it is kept."""
    if (role == "staff") != (dealer_id is not None):
        raise click.UsageError("--dealer is needed for a staff key, and only for one.")
    try:
        key_id, key = store().make_key(role, dealer_id, note)
    except (DomainError, StorageUnavailable) as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"Key {key_id} ({role}{f' of dealer {dealer_id}' if dealer_id else ''}) made. Send it as "
               "'Authorization: Bearer <key>'; it is shown only now:", err=True)
    click.echo(key)


@keys_command.command("list")
@with_appcontext
def keys_list_command():
    """List the keys: id, role, dealer, when made, last used, revoked and note (never the key)."""
    zone = store().zone
    click.echo("id\trole\tdealer\tcreated\tlast used\trevoked\tnote")
    for key_id, role, dealer_id, note, *instants in store().list_keys():
        shown = [format_instant(instant, zone) if instant else "-" for instant in instants]
        click.echo("\t".join([str(key_id), role, str(dealer_id or "-"), *shown, note]))


@keys_command.command("revoke")
@click.argument("key_id", type=click.IntRange(min=1, max=ID_SPAN - 1))
@with_appcontext
def keys_revoke_command(key_id):
    """Revoke key KEY_ID: every process refuses it from now on."""
    try:
        revoked = store().revoke_key(key_id)
    except (DomainError, StorageUnavailable) as error:
        raise click.ClickException(str(error)) from None
    if not revoked:
        raise click.ClickException(f"There is no key {key_id} in force (see `keys list`).")
    click.echo(f"Key {key_id} revoked.")


def copy_records(records, counters, db):
    """Write every record into the empty database of `db`, in one transaction, ids kept and each id
    counter set past them. Dealers come first without turnaround, and have it last: a turnaround
    applies to what is booked from then on, so every booking and window goes in as it stands."""
    with db.transaction(write=True):
        db.delete("dealer", SEED_DEALER_ID)  # the one a new database has
        for dealer in records["dealers"]:
            db.insert("dealer", {name: getattr(dealer, name) for name in DEALER_FIELDS} | {"turnaround_minutes": 0},
                      record_id=dealer.id)
        for kind, key in [("car", "cars"), ("booking", "bookings"), ("window", "windows")]:
            for record in records[key]:
                db.insert(kind, {name: getattr(record, name) for name in TABLES[kind][1]}, record_id=record.id)
        for dealer in records["dealers"]:
            if dealer.turnaround_minutes:
                db.update("dealer", dealer.id, {name: getattr(dealer, name) for name in DEALER_FIELDS})
        db.set_id_counters(counters)


@click.command("copy-to")
@click.argument("target")
@with_appcontext
def copy_to_command(target):
    """Copy every record into TARGET, an empty database: a SQLite file's path or a PostgreSQL URL.

    Ids are kept, and new records get ids above every one given here. Copy while no one writes
    (stop the service, or copy a backup): what is written meanwhile is not copied."""
    source = store().engine
    with source.reader() as db:
        records, _ = db.load()
        counters, keys = db.id_counters(), db.key_rows()
    if not target.startswith(POSTGRES_SCHEMES):
        target = os.path.abspath(target)
    engine = open_engine(target, current_app.config)
    try:
        with engine.writer() as db:
            found, _ = db.load()
            if found["cars"] or found["bookings"] or found["windows"] or \
                    found["dealers"] != [Dealer(SEED_DEALER_ID, **SEED_DEALER)]:
                raise click.ClickException(
                    f"{engine.name} already holds records ({plural(len(found['dealers']), 'dealer')}, "
                    f"{plural(len(found['cars']), 'car')}, {plural(len(found['bookings']), 'booking')}): copy-to "
                    "only fills a new, empty database. Nothing was copied.")
            with db.transaction(write=True):
                copy_records(records, counters, db)
                db.copy_keys(keys)
    except engine.Error as error:
        raise click.ClickException(f"Could not copy into {engine.name}: {error}. Nothing was copied.") from None
    finally:
        engine.close()
    click.echo(f"Copied {plural(len(records['dealers']), 'dealer')}, {plural(len(records['cars']), 'car')}, "
               f"{plural(len(records['bookings']), 'booking')}, "
               f"{plural(len(records['windows']), 'maintenance window')} and {plural(len(keys), 'API key')} from "
               f"{source.name} to {engine.name}.")


# ---------------------------------------------------------------------------------------------
# Wiring: init_app mounts the service on any Flask app; create_app builds the standalone one
# ---------------------------------------------------------------------------------------------


def open_database(app):
    """The storage engine on the database that DEALERSHIP_DATABASE names: a PostgreSQL URL, a path relative to the
    instance folder (made if missing), an absolute path, or ":memory:"."""
    path = app.config["DEALERSHIP_DATABASE"]
    if path != MEMORY and not path.startswith(POSTGRES_SCHEMES):
        path = os.path.join(app.instance_path, path)  # an absolute path stays as it is
        folder = os.path.dirname(path)
        try:
            if os.path.commonpath([app.instance_path, path]) == app.instance_path:
                os.makedirs(folder, exist_ok=True)  # the instance folder is the service's to make
        except OSError as error:
            raise ConfigError(f"DEALERSHIP_DATABASE={path!r}: its folder cannot be made ({error}).") from None
        if not os.path.isdir(folder):
            raise ConfigError(f"DEALERSHIP_DATABASE={path!r}: the folder {folder!r} does not exist.")
    # A worker of serve never creates the file: its supervisor made or found it at start, so a
    # missing one was deleted or moved since, and a new empty file would hide that.
    return open_engine(path, app.config, create=not os.environ.get(SERVE_WORKER))


def load_demo_data(engine, zone):
    """Into a database without cars only: a second dealer (with an hour of turnaround), six cars (one
    in maintenance), three bookings and a maintenance window in the coming days. One transaction, so processes starting together load it once."""
    with engine.writer() as writer, writer.transaction(write=True) as db:
        if not db.is_empty():
            log.info("%s: demo data skipped: the database has cars already (DEALERSHIP_DEMO_DATA only fills "
                     "an empty one)", engine.name)
            return
        first = next(iter(db.records("dealer")), None)
        main = first.id if first else db.insert("dealer", SEED_DEALER)
        north = db.insert("dealer", {"name": "Oscar Mobility North", "location": "Hamburg, Germany",
                                     "turnaround_minutes": 60})
        # VINs unlike the README's and the docs' examples, which can then be tried on a demo too, and
        # each with its own last six characters, the part the board shows
        cars = [("Toyota", "Corolla", 2024, "White", 59.9, "JTDBR32E720654321", "available", main),
                ("Volkswagen", "Golf", 2023, "Grey", 64.5, "WVWZZZ1KZ6W612345", "available", main),
                ("BMW", "320i", 2022, "Black", 89.0, "WBA8E9C50GK283517", "maintenance", main),
                ("Mercedes-Benz", "C 200", 2024, "Silver", 95.0, "WDD2050421R470962", "available", north),
                ("Skoda", "Octavia", 2021, "Blue", 55.0, "TMBJJ7NE8L0395148", "available", north),
                ("Tesla", "Model 3", 2025, "Red", 110.0, "5YJ3E1EA7KF731804", "available", north)]
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
    log.info("%s: demo data loaded", engine.name)


def init_limits(app):
    """The app's own Flask-Limiter (two apps share no counts): refused API keys are throttled per
    client address, and DEALERSHIP_RATE_LIMIT, when set, limits every request to the API (its feeds
    included) and to the board, each per route as Flask-Limiter counts a blueprint's limit; the docs
    stay open. Only when there is something to limit: Flask-Limiter's checks cost some 0.06 ms on
    every request."""
    if not app.config["DEALERSHIP_API_KEY"] and not app.config["DEALERSHIP_RATE_LIMIT"] and \
            not app.extensions[EXTENSION].keys_made():
        return
    limiter = Limiter(get_remote_address, storage_uri=app.config["DEALERSHIP_RATELIMIT_STORAGE_URI"],
                      headers_enabled=True, swallow_errors=True)
    limiter.init_app(app)
    # A request with the right key is never held up by refusals, whoever else sent them from its address.
    limiter.limit(app.config["DEALERSHIP_REFUSED_KEY_LIMIT"], deduct_when=lambda response: response.status_code == 401,
                  exempt_when=lambda: not key_required() or sent_access() is not None, scope="refused API keys",
                  error_message="Too many refused API keys from this address: wait before trying again.")(bp)
    if app.config["DEALERSHIP_RATE_LIMIT"]:
        for blueprint in (bp, board_bp):  # a limit names its blueprint: it holds wherever that is mounted
            limiter.limit(app.config["DEALERSHIP_RATE_LIMIT"], scope="requests",
                          error_message="Too many requests from this address: wait before trying again.")(blueprint)


def init_app(app, url_prefix=API_PREFIX, docs_prefix=None, board_prefix=None):
    """Give `app` its own store on its database and mount the API at `url_prefix`.

    With `docs_prefix` ("" for the root), also mount {docs_prefix}/openapi.json and {docs_prefix}/docs;
    with `board_prefix` ("" for the root), the planning board at {board_prefix}/board.
    Settings are read from app.config (see SETTINGS); a bad one, or a database file that cannot be
    used, raises ConfigError. Registers the `backup`, `copy-to` and `serve` CLI commands.
    """
    for name, (default, read) in SETTINGS.items():
        app.config[name] = read(name, app.config.get(name, default))
    zone = ZoneInfo(app.config["DEALERSHIP_TIMEZONE"])
    engine = open_database(app)
    if app.config["DEALERSHIP_DEMO_DATA"]:
        load_demo_data(engine, zone)
    service = Store(engine, zone=zone, history=timedelta(days=app.config["DEALERSHIP_HISTORY_DAYS"]))
    if not app.config["DEALERSHIP_API_KEY"] and not service.keys_made() and not os.environ.get(SERVE_WORKER):
        log.warning("DEALERSHIP_API_KEY is not set: anyone who can reach the service can change its data.")
    app.extensions[EXTENSION] = service
    app.extensions[REFUSED_KEYS] = RefusedKeyLog()
    app.extensions[RENDERINGS] = Renderings()
    presentation = Presentation(zone, app.config["DEALERSHIP_CURRENCY"])

    @app.before_request
    def present():
        """Date-times and prices in this app's zone and currency, for the request it handles."""
        PRESENTATION.set(presentation)

    init_limits(app)
    if app.url_map.converters.setdefault("digits", Digits) is not Digits:
        raise ConfigError("The app already has a URL converter named 'digits'; the service needs its own.")
    app.register_blueprint(bp, url_prefix=url_prefix)
    app.cli.add_command(backup_command)
    app.cli.add_command(copy_to_command)
    app.cli.add_command(keys_command)
    app.cli.add_command(serve_command)
    if docs_prefix is not None:
        init_docs(app, docs_prefix)
    if board_prefix is not None:
        app.register_blueprint(board_bp, url_prefix=board_prefix or None)
    return service


def create_app(config=None):
    """A standalone app: the API under /api/v1, /openapi.json, /docs, /health, and JSON for every error.

    Settings come from the environment (DEALERSHIP_*), then from `config`, which wins.
    """
    app = Flask(__name__)
    app.config.update({name: os.environ[name] for name in SETTINGS if name in os.environ})
    app.config.update(config or {})
    default, read = SETTINGS["DEALERSHIP_LOG_FORMAT"]
    configure_logging(read("DEALERSHIP_LOG_FORMAT", app.config.get("DEALERSHIP_LOG_FORMAT", default)))
    observe(app)  # before init_app's hooks (Flask-Limiter's): every request has its id
    init_app(app, docs_prefix="", board_prefix="")
    proxies = app.config["DEALERSHIP_PROXIES"]
    if proxies:  # the client's address and scheme as the trusted proxies in front say
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)
    # Routing misses (404, 405) happen before a blueprint is chosen: they need app-level handlers.
    handle_errors(app)

    @app.get("/")
    def home():
        """The front door of the standalone service: the interactive docs."""
        return redirect(docs_url())

    @app.get("/health")
    def health():
        """Liveness: the service answers, and so does its database (a trivial read)."""
        try:
            details = store().ping()
        except store().engine.Error as error:
            raise StorageUnavailable(f"The database does not answer: {error}.", retry_after=5) from None
        return json_response({"status": "ok", "database": "ok"} | details)

    @app.get("/health/ready")
    def ready():
        """Readiness: the database answers, and this process's store holds everything committed to it."""
        try:
            details = store().ping()
            store().refresh()
        except store().engine.Error as error:
            raise StorageUnavailable(f"Not ready: the database cannot be read ({error}).", retry_after=5) from None
        return json_response({"status": "ready", "database": "ok"} | details)

    @app.get("/metrics")
    def metrics():
        """The metrics in Prometheus's text format: this process's, or under serve with several workers
        the sums over all of them (prometheus_client's multiprocess mode)."""
        if not app.config["DEALERSHIP_METRICS"]:
            raise NotFound("The metrics are off (DEALERSHIP_METRICS=off).")
        key = app.config["DEALERSHIP_METRICS_KEY"]
        if key and not carries(key):
            raise Unauthorized("The metrics need DEALERSHIP_METRICS_KEY: send 'Authorization: Bearer <metrics key>'.",
                               www_authenticate=WWWAuthenticate("bearer", {"realm": "metrics"}))
        service = store()
        service.sync()
        service.count_records()
        registry = service.metrics.registry
        if METRICS_FOLDER in os.environ:
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry)
        return Response(prometheus_client.generate_latest(registry), content_type=prometheus_client.CONTENT_TYPE_LATEST)

    return app
