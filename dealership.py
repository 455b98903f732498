"""Car dealership inventory and booking service: one Flask module.

Dealers own cars; customers book a car for a date-time range, and the service never books one car
twice for overlapping times. It answers "which cars are free between X and Y?" as well.

Run it for a local demo:

    flask --app dealership run

Embed it in a larger Flask app:

    import dealership
    dealership.init_app(app, url_prefix="/api/v1")

Time rules: date-times are ISO 8601. A value with an offset is that instant; a value without one
is taken as UTC. Every comparison is between instants, and responses carry the offset. Booking
intervals are half-open, [start, end): a booking that ends at 10:00 and one that starts at 10:00
do not overlap.

State lives in memory, per app (``app.extensions["dealership"]``): serve it from one process.
"""
import bisect
import json
import re
import threading
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from itertools import count
from operator import attrgetter

from flask import Blueprint, Flask, Response, current_app, request, url_for
from marshmallow import Schema, ValidationError, fields, validate, validates_schema
from werkzeug.exceptions import (BadRequest, Conflict, HTTPException, NotFound, RequestEntityTooLarge,
                                 UnsupportedMediaType)

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

API_PREFIX = "/api/v1"
EXTENSION = "dealership"
# 17 characters; I, O and Q never occur in a VIN.
VIN_PATTERN = r"^[A-HJ-NPR-Z0-9]{17}$"
FIRST_CAR_YEAR = 1886
MAX_DAILY_PRICE = 1_000_000
CAR_STATUSES = ("available", "maintenance")
DEFAULT_MAX_CONTENT_LENGTH = 1024 * 1024
SEED_DEALER = {"name": "Oscar Mobility Main", "location": "Munich, Germany"}

# ---------------------------------------------------------------------------------------------
# Records: immutable, so a reader never sees half an update; a change stores a new record.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dealer:
    id: int
    name: str
    location: str


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
    json: str  # the public JSON form, rendered once by CAR_SCHEMA when the record is written


@dataclass(frozen=True, slots=True)
class Booking:
    id: int
    car_id: int
    customer_name: str
    customer_email: str
    start_datetime: datetime  # aware, UTC
    end_datetime: datetime  # aware, UTC


by_start = attrgetter("start_datetime")
by_end = attrgetter("end_datetime")

# ---------------------------------------------------------------------------------------------
# Domain rules: pure functions over half-open intervals [start, end)
# ---------------------------------------------------------------------------------------------


def overlaps(start_a, end_a, start_b, end_b):
    """True when [start_a, end_a) and [start_b, end_b) share at least one instant."""
    return start_a < end_b and start_b < end_a


def clash(schedule, start, end):
    """The booking in `schedule` that overlaps [start, end), or None.

    A car's bookings never overlap, so its schedule sorted by start is sorted by end too: only the
    last booking that starts before `end` can reach into the range.
    """
    i = bisect.bisect_left(schedule, end, key=by_start)
    if i and schedule[i - 1].end_datetime > start:
        return schedule[i - 1]
    return None


def busy_in(schedule, start, end):
    """The bookings of one schedule that overlap [start, end), in time order."""
    first = bisect.bisect_right(schedule, start, key=by_end)
    last = bisect.bisect_left(schedule, end, key=by_start)
    return schedule[first:last]


# ---------------------------------------------------------------------------------------------
# The store: the only code that changes state; each change checks and writes under one lock.
# ---------------------------------------------------------------------------------------------


class Store:
    def __init__(self, zone=timezone.utc):
        self.zone = zone  # the zone that naive input is read in and that output is written in
        self.lock = threading.Lock()
        self.dealers = {}
        self.cars = {}
        self.bookings = {}
        self.car_by_vin = {}
        self.schedules = {}  # car id -> that car's bookings, sorted by start
        self._dealer_ids = count(1)
        self._car_ids = count(1)
        self._booking_ids = count(1)

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

    # -- dealers --------------------------------------------------------------------------------

    def add_dealer(self, name, location=""):
        with self.lock:
            dealer = Dealer(next(self._dealer_ids), name, location)
            self.dealers[dealer.id] = dealer
            return dealer

    # -- cars -----------------------------------------------------------------------------------

    def add_car(self, fields):
        with self.lock:
            self.dealer(fields["dealer_id"])
            self._check_vin_free(fields["vin"])
            car = new_car(next(self._car_ids), fields)
            self.cars[car.id] = car
            self.car_by_vin[car.vin] = car.id
            self.schedules[car.id] = []
            return car

    def update_car(self, car_id, changes):
        with self.lock:
            old = self.car(car_id)
            if "dealer_id" in changes:
                self.dealer(changes["dealer_id"])
            if changes.get("vin", old.vin) != old.vin:
                self._check_vin_free(changes["vin"])
            fields = {name: getattr(old, name) for name in CAR_FIELDS}
            car = new_car(car_id, fields | changes)
            del self.car_by_vin[old.vin]
            self.car_by_vin[car.vin] = car_id
            self.cars[car_id] = car
            return car

    def delete_car(self, car_id):
        with self.lock:
            self.car(car_id)
            booked = len(self.schedules[car_id])
            if booked:
                raise Conflict(f"Car {car_id} has {booked} booking{'s' if booked > 1 else ''}; "
                               "cancel its bookings before deleting the car.")
            car = self.cars.pop(car_id)
            del self.car_by_vin[car.vin]
            del self.schedules[car_id]

    def _check_vin_free(self, vin):
        if vin in self.car_by_vin:
            raise Conflict(f"VIN {vin} is already used by car {self.car_by_vin[vin]}.")

    # -- bookings -------------------------------------------------------------------------------

    def add_booking(self, fields):
        with self.lock:
            self._check_bookable(fields["car_id"], fields["start_datetime"], fields["end_datetime"])
            booking = Booking(id=next(self._booking_ids), **fields)
            self.bookings[booking.id] = booking
            bisect.insort(self.schedules[booking.car_id], booking, key=by_start)
            return booking

    def cancel_booking(self, booking_id):
        with self.lock:
            booking = self.booking(booking_id)
            del self.bookings[booking_id]
            self._unschedule(booking)
            return booking

    def _check_bookable(self, car_id, start, end):
        car = self.car(car_id)
        if car.status != "available":
            raise Conflict(f"Car {car_id} is in {car.status} and cannot be booked.")
        other = clash(self.schedules[car_id], start, end)
        if other:
            raise Conflict(f"Car {car_id} is already booked from {self.show(other.start_datetime)} "
                           f"to {self.show(other.end_datetime)} by booking {other.id}.")

    def _unschedule(self, booking):
        schedule = self.schedules[booking.car_id]
        del schedule[bisect.bisect_left(schedule, booking.start_datetime, key=by_start)]

    # -- queries --------------------------------------------------------------------------------

    def free_cars(self, start, end):
        """Cars whose status is available and that have no booking overlapping [start, end)."""
        schedules = self.schedules
        return [car for car in list(self.cars.values())
                if car.status == "available" and not clash(schedules[car.id], start, end)]

    def find_bookings(self, car_id=None, start=None, end=None):
        """Bookings ordered by start then id: overlapping [start, end) when both are given,
        starting at or after `start` or ending at or before `end` when only one is."""
        if car_id is not None:
            found = list(self.schedules.get(car_id, ()))  # a car's starts are distinct
        else:
            found = sorted(list(self.bookings.values()), key=lambda b: (b.start_datetime, b.id))
        if start is not None and end is not None:
            return [b for b in found if overlaps(b.start_datetime, b.end_datetime, start, end)]
        if start is not None:
            return [b for b in found if b.start_datetime >= start]
        if end is not None:
            return [b for b in found if b.end_datetime <= end]
        return found

    def show(self, instant):
        """An instant as ISO 8601 in the store's zone."""
        return instant.astimezone(self.zone).isoformat()


CAR_FIELDS = ("brand", "model", "year", "color", "daily_price", "vin", "status", "dealer_id")


def new_car(car_id, fields):
    """A Car record with its public JSON form rendered once, here."""
    data = {"id": car_id} | {name: fields[name] for name in CAR_FIELDS}
    return Car(**data, json=to_json(CAR_SCHEMA.dump(data)))


def to_json(data):
    return json.dumps(data, separators=(",", ":"))


def store():
    """The store of the app handling this request."""
    return current_app.extensions[EXTENSION]


# ---------------------------------------------------------------------------------------------
# Schemas: the one definition of every field, for input and output
# ---------------------------------------------------------------------------------------------


class Text(fields.String):
    """A string with surrounding whitespace stripped before it is validated."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).strip()


class Vin(Text):
    """A VIN, accepted in any case and stored upper-case."""

    def _deserialize(self, value, attr, data, **kwargs):
        return super()._deserialize(value, attr, data, **kwargs).upper()


class JSONNumber(fields.Float):
    """A JSON number: a string such as "100" is refused, not converted."""

    def _validated(self, value):
        if not isinstance(value, (int, float)):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class Instant(fields.DateTime):
    """An ISO 8601 date-time read as an aware UTC instant and written in the store's zone.

    A value without an offset is taken in the store's zone (UTC unless configured).
    """

    default_error_messages = {"range": "Date-time is out of the supported range."}
    # In a query string an unencoded "+" arrives as a space: "10:00:00 02:00" means "+02:00".
    _PLUS_AS_SPACE = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$")

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            value = self._PLUS_AS_SPACE.sub(r"\1+\2", value)
        moment = super()._deserialize(value, attr, data, **kwargs)
        zone = store().zone
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        try:
            moment.astimezone(zone)  # output must be writable in the store's zone too
            return moment.astimezone(timezone.utc)
        except OverflowError:
            raise self.make_error("range") from None

    def _serialize(self, value, attr, obj, **kwargs):
        return None if value is None else store().show(value)


def year_not_after_next(value):
    latest = datetime.now(timezone.utc).year + 1
    if value > latest:
        raise ValidationError(f"Must be between {FIRST_CAR_YEAR} and {latest}.")


def check_window(data):
    """end_datetime must be after start_datetime: raised on end_datetime."""
    start, end = data.get("start_datetime"), data.get("end_datetime")
    if start is not None and end is not None and end <= start:
        raise ValidationError("Must be after start_datetime.", field_name="end_datetime")


class DealerSchema(Schema):
    id = fields.Integer(dump_only=True)
    name = Text(required=True, validate=validate.Length(min=1, max=200))
    location = Text(load_default="", validate=validate.Length(max=200))


class CarSchema(Schema):
    id = fields.Integer(dump_only=True)
    brand = Text(required=True, validate=validate.Length(min=1, max=100))
    model = Text(required=True, validate=validate.Length(min=1, max=100))
    year = fields.Integer(required=True, strict=True,
                          validate=[validate.Range(min=FIRST_CAR_YEAR), year_not_after_next])
    color = Text(required=True, validate=validate.Length(min=1, max=100))
    daily_price = JSONNumber(required=True,
                             validate=validate.Range(min=0, max=MAX_DAILY_PRICE, min_inclusive=False))
    vin = Vin(required=True, validate=validate.Regexp(VIN_PATTERN, error="Must be 17 characters of "
                                                       "A-H, J-N, P, R-Z and 0-9 (no I, O or Q)."))
    status = fields.String(load_default="available", validate=validate.OneOf(CAR_STATUSES))
    dealer_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))


class BookingSchema(Schema):
    id = fields.Integer(dump_only=True)
    car_id = fields.Integer(required=True, strict=True, validate=validate.Range(min=1))
    customer_name = Text(required=True, validate=validate.Length(min=1, max=200))
    customer_email = fields.Email(required=True, validate=validate.Length(max=254))
    start_datetime = Instant(required=True)
    end_datetime = Instant(required=True)

    @validates_schema
    def end_after_start(self, data, **kwargs):
        check_window(data)


class CarQuery(Schema):
    status = fields.String(validate=validate.OneOf(CAR_STATUSES))
    dealer_id = fields.Integer(validate=validate.Range(min=1))
    brand = Text()


class BookingQuery(Schema):
    car_id = fields.Integer(validate=validate.Range(min=1))
    start_datetime = Instant()
    end_datetime = Instant()

    @validates_schema
    def end_after_start(self, data, **kwargs):
        check_window(data)


class WindowQuery(Schema):
    start_datetime = Instant(required=True)
    end_datetime = Instant(required=True)

    @validates_schema
    def end_after_start(self, data, **kwargs):
        check_window(data)


DEALER_SCHEMA = DealerSchema()
CAR_SCHEMA = CarSchema()
BOOKING_SCHEMA = BookingSchema()
CAR_QUERY = CarQuery()
BOOKING_QUERY = BookingQuery()
WINDOW_QUERY = WindowQuery()

# ---------------------------------------------------------------------------------------------
# HTTP helpers and errors: every error is application/problem+json (RFC 9457)
# ---------------------------------------------------------------------------------------------

bp = Blueprint(EXTENSION, __name__)


def problem(status, title, detail, errors=None):
    body = {"title": title, "status": status, "detail": detail}
    if errors is not None:
        body["errors"] = errors
    return Response(to_json(body), status, mimetype="application/problem+json")


def http_error(error):
    response = problem(error.code, error.name, error.description)
    if error.code == 405 and error.valid_methods:
        response.headers["Allow"] = ", ".join(error.valid_methods)
    return response


def validation_error(error):
    messages = error.messages if isinstance(error.messages, dict) else {"_schema": error.messages}
    fields_named = ", ".join(sorted(messages))
    return problem(422, "Unprocessable Content", f"Invalid input: {fields_named}.", messages)


bp.register_error_handler(HTTPException, http_error)
bp.register_error_handler(ValidationError, validation_error)


def json_body():
    """The request body as a JSON object, or a 415/400 that says what was wrong."""
    limit = request.max_content_length = current_app.config["DEALERSHIP_MAX_CONTENT_LENGTH"]
    if not request.is_json:
        raise UnsupportedMediaType("Send the body as JSON with 'Content-Type: application/json'.")
    try:
        body = request.get_json()
    except RequestEntityTooLarge:
        raise RequestEntityTooLarge(f"The body is larger than the limit of {limit} bytes.") from None
    except BadRequest:
        raise BadRequest("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise BadRequest("The body must be a JSON object.")
    return body


def query(schema):
    """The query string, validated by `schema`; a bad or unknown parameter is a 422."""
    return schema.load(request.args.to_dict())


def json_list(parts, status=200):
    """A JSON array from items that are already JSON text."""
    return Response("[" + ",".join(parts) + "]", status, mimetype="application/json")


def created(body, location):
    return body, 201, {"Location": location}


# ---------------------------------------------------------------------------------------------
# Routes: dealers
# ---------------------------------------------------------------------------------------------


@bp.get("/dealers")
def list_dealers():
    """All dealers, ordered by id."""
    return DEALER_SCHEMA.dump(list(store().dealers.values()), many=True)


@bp.get("/dealers/<int:dealer_id>")
def get_dealer(dealer_id):
    """One dealer."""
    return DEALER_SCHEMA.dump(store().dealer(dealer_id))


# ---------------------------------------------------------------------------------------------
# Routes: cars
# ---------------------------------------------------------------------------------------------


@bp.post("/cars")
def create_car():
    """Add a car to the inventory."""
    car = store().add_car(CAR_SCHEMA.load(json_body()))
    return created(Response(car.json, mimetype="application/json"), url_for(".get_car", car_id=car.id))


@bp.get("/cars")
def list_cars():
    """Cars ordered by id, optionally filtered by status, dealer and brand."""
    filters = query(CAR_QUERY)
    status, dealer_id = filters.get("status"), filters.get("dealer_id")
    brand = filters.get("brand", "").casefold()
    cars = [car for car in list(store().cars.values())
            if (status is None or car.status == status)
            and (dealer_id is None or car.dealer_id == dealer_id)
            and (not brand or car.brand.casefold() == brand)]
    return json_list(car.json for car in cars)


@bp.get("/cars/<int:car_id>")
def get_car(car_id):
    """One car."""
    return Response(store().car(car_id).json, mimetype="application/json")


@bp.put("/cars/<int:car_id>")
def update_car(car_id):
    """Change the fields given; the others keep their values."""
    store().car(car_id)  # an unknown car is a 404 before its body is judged
    changes = CAR_SCHEMA.load(json_body(), partial=True)
    return Response(store().update_car(car_id, changes).json, mimetype="application/json")


@bp.delete("/cars/<int:car_id>")
def delete_car(car_id):
    """Remove a car that has no bookings."""
    store().delete_car(car_id)
    return "", 204


# ---------------------------------------------------------------------------------------------
# Routes: bookings
# ---------------------------------------------------------------------------------------------


@bp.post("/bookings")
def create_booking():
    """Book a car for [start_datetime, end_datetime)."""
    booking = store().add_booking(BOOKING_SCHEMA.load(json_body()))
    return created(BOOKING_SCHEMA.dump(booking), url_for(".get_booking", booking_id=booking.id))


@bp.get("/bookings")
def list_bookings():
    """Bookings ordered by start then id, optionally filtered by car and time range."""
    filters = query(BOOKING_QUERY)
    found = store().find_bookings(filters.get("car_id"), filters.get("start_datetime"),
                                  filters.get("end_datetime"))
    return BOOKING_SCHEMA.dump(found, many=True)


@bp.get("/bookings/<int:booking_id>")
def get_booking(booking_id):
    """One booking."""
    return BOOKING_SCHEMA.dump(store().booking(booking_id))


@bp.delete("/bookings/<int:booking_id>")
def cancel_booking(booking_id):
    """Cancel a booking; its time is free again."""
    store().cancel_booking(booking_id)
    return "", 204


@bp.get("/bookings/available-cars")
def available_cars():
    """Cars that are available and have no booking overlapping the window, ordered by id."""
    window = query(WINDOW_QUERY)
    return json_list(car.json for car in store().free_cars(window["start_datetime"], window["end_datetime"]))


# ---------------------------------------------------------------------------------------------
# Wiring: init_app mounts the service on any Flask app; create_app builds the standalone one
# ---------------------------------------------------------------------------------------------


def init_app(app, url_prefix=API_PREFIX):
    """Give `app` its own empty store (plus the seed dealer) and mount the API at `url_prefix`."""
    app.config.setdefault("DEALERSHIP_MAX_CONTENT_LENGTH", DEFAULT_MAX_CONTENT_LENGTH)
    service = Store()
    service.add_dealer(**SEED_DEALER)
    app.extensions[EXTENSION] = service
    app.register_blueprint(bp, url_prefix=url_prefix)
    return service


def create_app(config=None):
    """A standalone app: the API under /api/v1, /health, and JSON for every error."""
    app = Flask(__name__)
    app.config.update(config or {})
    init_app(app)
    # Routing misses (404, 405) and 413 raised before a blueprint is chosen need app-level handlers.
    app.register_error_handler(HTTPException, http_error)

    @app.get("/health")
    def health():
        """Liveness: the service answers."""
        return {"status": "ok"}

    return app
