"""Tests for the dealership service, through the HTTP API of a fresh app per test."""
import gc
import hashlib
import json
import logging
import os
import random
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import unicodedata
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone

import icalendar
import pytest

import dealership
from dealership import create_app

API = "/api/v1"
PROBLEM = "application/problem+json"


# A superuser's URL to a PostgreSQL server: each test that uses it gets databases of its own.
POSTGRES_URL = os.environ.get("DEALERSHIP_TEST_DATABASE_URL")
NO_POSTGRES = "PostgreSQL: set DEALERSHIP_TEST_DATABASE_URL to a superuser's URL (.ci/run does) to run these too"
ENGINES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(not POSTGRES_URL, reason=NO_POSTGRES))]
fresh_names = iter(range(1, 1_000_000))


@pytest.fixture(scope="session")
def postgres_tests_database():
    """One database for the test run, dropped after it; each test works in schemas of its own there."""
    import psycopg

    name = f"dealership_tests_{os.getpid()}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    parts = urllib.parse.urlsplit(POSTGRES_URL)
    url = urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION btree_gist")  # in public, where the schemas' constraints find it
    try:
        yield url
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class PostgresDatabases:
    """New, empty PostgreSQL databases for one test, each a schema of its own in the run's database
    (a URL whose search_path names it); after the test, every pool the service opened is closed and
    the schemas dropped."""

    def __init__(self, monkeypatch, url):
        self.url, self.schemas, self.opened = url, [], []
        original = dealership.PostgresEngine.__init__

        def tracked(engine, *args, **kwargs):
            original(engine, *args, **kwargs)
            self.opened.append(engine)
        monkeypatch.setattr(dealership.PostgresEngine, "__init__", tracked)

    def new(self):
        import psycopg

        schema = f"test_{next(fresh_names)}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        parts = urllib.parse.urlsplit(self.url)
        query = "&".join(filter(None, [parts.query, f"options=-csearch_path%3D{schema}"]))
        return urllib.parse.urlunsplit(parts._replace(query=query))

    def drop(self):
        import psycopg

        for engine in self.opened:
            engine.close()
        with psycopg.connect(self.url, autocommit=True) as conn:
            for schema in self.schemas:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_databases(monkeypatch, request):
    if not POSTGRES_URL:
        pytest.skip(NO_POSTGRES)
    databases = PostgresDatabases(monkeypatch, request.getfixturevalue("postgres_tests_database"))
    try:
        yield databases
    finally:
        databases.drop()


@pytest.fixture
def postgres_database(postgres_databases):
    """The URL of a new, empty PostgreSQL database (a schema of its own)."""
    return postgres_databases.new()


# The engine every test's own app runs on (tests of two apps on one database run on SQLite and
# PostgreSQL whatever this says): "memory" (the default), "sqlite" or "postgresql".
TEST_ENGINE = os.environ.get("DEALERSHIP_TEST_ENGINE", "memory")
fresh_databases = []  # what new_app takes its database from, in this test (see no_instance_database)


def new_app(config=None):
    """A standalone app on a fresh database, in memory unless DEALERSHIP_TEST_ENGINE says otherwise:
    tests never touch the instance folder."""
    return create_app({"TESTING": True, "DEALERSHIP_DATABASE": fresh_databases[0]()} | (config or {}))


def host_app(name):
    """A host app for embedding, its database in memory."""
    from flask import Flask

    host = Flask(name)
    host.config["DEALERSHIP_DATABASE"] = ":memory:"
    return host


@pytest.fixture(autouse=True)
def no_instance_database(monkeypatch, request, tmp_path):
    """A safety net: an app made without a database setting still gets an in-memory one. And where
    new_app takes its databases from: each a new one, on the engine under test."""
    monkeypatch.setenv("DEALERSHIP_DATABASE", ":memory:")
    names = iter(range(1, 1000))
    if TEST_ENGINE == "sqlite":
        fresh_databases[:] = [lambda: str(tmp_path / f"app-{next(names)}.sqlite3")]
    elif TEST_ENGINE == "postgresql":
        fresh_databases[:] = [request.getfixturevalue("postgres_databases").new]
    else:
        fresh_databases[:] = [lambda: dealership.MEMORY]


@pytest.fixture
def app():
    return new_app()


@pytest.fixture
def client(app):
    return app.test_client()


def car_body(**changes):
    body = {"brand": "Toyota", "model": "Camry", "year": 2023, "color": "Blue",
            "daily_price": 100.0, "vin": "1HGBH41JXMN109186", "dealer_id": 1}
    return body | changes


def make_car(client, **changes):
    response = client.post(f"{API}/cars", json=car_body(**changes))
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def vin(n):
    return f"1HGBH41JXM{n:07d}"


def booking_body(car_id, start="2035-01-15T10:00:00Z", end="2035-01-15T12:00:00Z", **changes):
    body = {"car_id": car_id, "customer_name": "Ada Lovelace", "customer_email": "ada@example.com",
            "start_datetime": start, "end_datetime": end}
    return body | changes


def book(client, car_id, start="2035-01-15T10:00:00Z", end="2035-01-15T12:00:00Z", **changes):
    return client.post(f"{API}/bookings", json=booking_body(car_id, start, end, **changes))


def assert_problem(response, status, *fields):
    assert response.status_code == status
    assert response.mimetype == PROBLEM
    body = response.get_json()
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    for name in fields:
        assert name in body["errors"], body
        assert all(isinstance(m, str) for m in body["errors"][name])
    return body


def window(start, end):
    return {"start_datetime": start, "end_datetime": end}


# ---------------------------------------------------------------------------------------------
# App, health, dealers
# ---------------------------------------------------------------------------------------------


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert (body.pop("status"), body.pop("database")) == ("ok", "ok")
    assert body == ({"pool": body.get("pool")} if TEST_ENGINE == "postgresql" else {})  # its state, on PostgreSQL


def test_the_front_door_leads_to_the_docs_and_the_api_index_to_everything(client):
    home = client.get("/")
    assert (home.status_code, home.headers["Location"]) == (302, "/docs")
    assert client.get("/docs").status_code == 200
    for path in (API, f"{API}/"):
        response = client.get(path)
        assert response.status_code == 200
        index = response.get_json()
        assert index["name"] == "Dealership API" and index["version"] == dealership.API_VERSION
        assert index["links"] == {"cars": f"{API}/cars", "bookings": f"{API}/bookings",
                                  "available_cars": f"{API}/bookings/available-cars",
                                  "available_slots": f"{API}/bookings/available-slots",
                                  "dealers": f"{API}/dealers", "holds": f"{API}/holds", "changes": f"{API}/changes",
                                  "openapi": "/openapi.json", "docs": "/docs"}
        for name, link in index["links"].items():
            if name not in ("available_cars", "available_slots", "holds"):  # holds: POST only
                assert client.get(link).status_code == 200, link


def test_an_embedded_service_leaves_the_root_to_its_host():
    host = host_app("host")
    dealership.init_app(host, url_prefix="/dealership/api/v1")
    client = host.test_client()
    assert client.get("/").status_code == 404  # the host's own, not a redirect
    assert client.get("/dealership/api/v1").get_json()["links"] == {
        "cars": "/dealership/api/v1/cars", "bookings": "/dealership/api/v1/bookings",
        "available_cars": "/dealership/api/v1/bookings/available-cars",
        "available_slots": "/dealership/api/v1/bookings/available-slots", "dealers": "/dealership/api/v1/dealers",
        "holds": "/dealership/api/v1/holds", "changes": "/dealership/api/v1/changes"}


def test_each_app_has_its_own_store():
    first, second = new_app().test_client(), new_app().test_client()
    make_car(first)
    assert len(first.get(f"{API}/cars").get_json()) == 1
    assert second.get(f"{API}/cars").get_json() == []


def test_seed_dealer(client):
    assert client.get(f"{API}/dealers").get_json() == [
        {"id": 1, "name": "Oscar Mobility Main", "location": "Munich, Germany", "turnaround_minutes": 0}]
    response = client.get(f"{API}/dealers/1")
    assert response.status_code == 200
    assert response.get_json()["name"] == "Oscar Mobility Main"


def test_unknown_dealer_is_404(client):
    body = assert_problem(client.get(f"{API}/dealers/99"), 404)
    assert "99" in body["detail"]


# ---------------------------------------------------------------------------------------------
# Cars
# ---------------------------------------------------------------------------------------------


def test_create_car(client):
    response = client.post(f"{API}/cars", json=car_body(brand="  Toyota ", vin="1hgbh41jxmn109186"))
    assert response.status_code == 201
    assert response.headers["Location"] == f"{API}/cars/1"
    assert response.get_json() == {"id": 1, "brand": "Toyota", "model": "Camry", "year": 2023,
                                   "color": "Blue", "daily_price": 100.0, "vin": "1HGBH41JXMN109186",
                                   "status": "available", "dealer_id": 1, "currency": "EUR"}
    assert client.get(f"{API}/cars/1").get_json() == response.get_json()


def test_create_car_in_maintenance(client):
    assert make_car(client, status="maintenance")["status"] == "maintenance"


@pytest.mark.parametrize("field, value", [
    ("brand", ""), ("brand", "   "), ("brand", "x" * 101), ("brand", 5), ("brand", None),
    ("model", ""), ("color", "  "),
    ("year", 1885), ("year", datetime.now().year + 2), ("year", 10**30), ("year", "2020"),
    ("year", 2020.5), ("year", True),
    ("daily_price", 0), ("daily_price", -1), ("daily_price", 1_000_000.01), ("daily_price", "100"),
    ("daily_price", 10**400), ("daily_price", True),
    ("vin", "1HGBH41JXMN10918"), ("vin", "1HGBH41JXMN1091867"), ("vin", "1HGBH41JXMN10918O"),
    ("vin", "IHGBH41JXMN109186"), ("vin", "QHGBH41JXMN109186"), ("vin", 12345678901234567),
    ("status", "sold"), ("status", None),
    ("dealer_id", "1"), ("dealer_id", 0), ("dealer_id", 1.5),
    ("id", 7),
])
def test_create_car_rejects_bad_field(client, field, value):
    body = assert_problem(client.post(f"{API}/cars", json=car_body(**{field: value})), 422, field)
    assert field in body["detail"]
    assert client.get(f"{API}/cars").get_json() == []


@pytest.mark.parametrize("field", ["brand", "model", "year", "color", "daily_price", "vin", "dealer_id"])
def test_create_car_requires_field(client, field):
    body = car_body()
    del body[field]
    assert_problem(client.post(f"{API}/cars", json=body), 422, field)


def test_price_of_1e309_is_422(client):
    response = client.post(f"{API}/cars", data=b'{"brand":"A","model":"B","year":2020,"color":"C",'
                           b'"daily_price":1e309,"vin":"1HGBH41JXMN109186","dealer_id":1}',
                           content_type="application/json")
    assert_problem(response, 422, "daily_price")


def test_price_at_the_limit_is_accepted(client):
    assert make_car(client, daily_price=1_000_000)["daily_price"] == 1_000_000


def test_car_with_unknown_dealer_is_404(client):
    body = assert_problem(client.post(f"{API}/cars", json=car_body(dealer_id=42)), 404)
    assert "dealer" in body["detail"] and "42" in body["detail"]
    assert client.get(f"{API}/cars").get_json() == []


def test_duplicate_vin_is_409_naming_the_car(client):
    make_car(client)
    body = assert_problem(client.post(f"{API}/cars", json=car_body(vin="1hgbh41jxmn109186")), 409)
    assert "1HGBH41JXMN109186" in body["detail"] and "car 1" in body["detail"]
    assert len(client.get(f"{API}/cars").get_json()) == 1


def test_list_cars_ordered_by_id_with_filters(client):
    make_car(client, vin=vin(1), brand="Toyota")
    make_car(client, vin=vin(2), brand="BMW", status="maintenance")
    make_car(client, vin=vin(3), brand="toyota")
    ids = lambda url: [car["id"] for car in client.get(url).get_json()]  # noqa: E731
    assert ids(f"{API}/cars") == [1, 2, 3]
    assert ids(f"{API}/cars?brand=TOYOTA") == [1, 3]
    assert ids(f"{API}/cars?status=maintenance") == [2]
    assert ids(f"{API}/cars?dealer_id=1&status=available") == [1, 3]
    assert ids(f"{API}/cars?dealer_id=2") == []


@pytest.mark.parametrize("query_string", ["status=sold", "dealer_id=abc", "dealer_id=0", "colour=red"])
def test_list_cars_rejects_bad_filter(client, query_string):
    name = query_string.split("=")[0]
    assert_problem(client.get(f"{API}/cars?{query_string}"), 422, name)


@pytest.mark.parametrize("query_string, name", [
    ("limit=1&limit=abc", "limit"), ("limit=1&limit=1", "limit"), ("status=available&status=maintenance", "status"),
    ("limit=%EF%BC%91", "limit"), ("limit=1_0", "limit"), ("limit=%201", "limit"), ("dealer_id=+1", "dealer_id"),
    ("offset=%D9%A1", "offset")])
def test_a_repeated_or_oddly_written_query_parameter_is_422_naming_it(client, query_string, name):
    make_car(client)
    assert_problem(client.get(f"{API}/cars?{query_string}"), 422, name)


def test_an_id_in_other_digits_is_404_and_changes_nothing(client):
    car = make_car(client)
    for path in ("/cars/%EF%BC%91", "/cars/%D9%A1", "/cars/%F0%9D%9F%8F"):  # fullwidth, Arabic-Indic, bold 1
        assert_problem(client.get(API + path), 404)
        assert_problem(client.put(API + path, json={"color": "Red"}), 404)
    assert client.get(f"{API}/cars/1").get_json() == car


def test_a_doubled_slash_is_404_not_a_redirect_to_another_host(client):
    response = client.post(f"{API}//cars", json=car_body(), headers={"Host": "evil.example"})
    assert_problem(response, 404)
    assert "Location" not in response.headers
    assert client.get(f"{API}/cars").get_json() == []


def test_get_unknown_car_is_404(client):
    body = assert_problem(client.get(f"{API}/cars/5"), 404)
    assert "5" in body["detail"]


@pytest.mark.parametrize("path", ["/cars/0", "/cars/-1", "/cars/abc", "/cars/1.5", "/bookings/0",
                                  "/bookings/x", "/dealers/-3"])
def test_path_id_that_is_not_a_positive_integer_is_404(client, path):
    make_car(client)
    assert_problem(client.get(API + path), 404)


def test_update_car_partially(client):
    make_car(client)
    response = client.put(f"{API}/cars/1", json={"color": " Red ", "status": "maintenance"})
    assert response.status_code == 200
    assert response.get_json() == car_body(color="Red") | {"id": 1, "status": "maintenance", "currency": "EUR"}
    assert client.get(f"{API}/cars/1").get_json()["color"] == "Red"


def test_update_car_vin_is_unique_and_keeps_its_own(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    assert client.put(f"{API}/cars/1", json={"vin": vin(1).lower()}).status_code == 200
    body = assert_problem(client.put(f"{API}/cars/1", json={"vin": vin(2)}), 409)
    assert "car 2" in body["detail"]
    assert client.put(f"{API}/cars/1", json={"vin": vin(3)}).get_json()["vin"] == vin(3)
    # the old VIN is free again
    assert make_car(client, vin=vin(1))["id"] == 3


@pytest.mark.parametrize("body", [{"year": 1800}, {"brand": ""}, {"id": 2}, {"daily_price": None},
                                  {"color": "Red", "vin": "short"}])
def test_update_car_rejects_bad_fields_and_changes_nothing(client, body):
    before = make_car(client)
    assert_problem(client.put(f"{API}/cars/1", json=body), 422)
    assert client.get(f"{API}/cars/1").get_json() == before


def test_update_car_with_unknown_dealer_is_404(client):
    before = make_car(client)
    assert_problem(client.put(f"{API}/cars/1", json={"dealer_id": 9}), 404)
    assert client.get(f"{API}/cars/1").get_json() == before


def test_update_unknown_car_is_404(client):
    assert_problem(client.put(f"{API}/cars/3", json={"color": "Red"}), 404)


def test_delete_car(client):
    make_car(client)
    response = client.delete(f"{API}/cars/1")
    assert response.status_code == 204
    assert response.data == b""
    assert_problem(client.get(f"{API}/cars/1"), 404)
    assert make_car(client)["id"] == 2  # its VIN is free; ids are never reused


def test_delete_car_with_bookings_is_409_with_count(client):
    make_car(client)
    book(client, 1)
    book(client, 1, "2035-02-01T00:00:00Z", "2035-02-02T00:00:00Z")
    body = assert_problem(client.delete(f"{API}/cars/1"), 409)
    assert "2 bookings" in body["detail"]
    assert client.get(f"{API}/cars/1").status_code == 200


def test_delete_unknown_car_is_404(client):
    assert_problem(client.delete(f"{API}/cars/1"), 404)


def test_every_json_body_keeps_field_order_and_ends_with_one_newline(client):
    make_car(client)
    book(client, 1)
    client.post(f"{API}/cars/1/maintenance-windows", json=window("2035-01-20T10:00:00Z", "2035-01-20T12:00:00Z"))
    fields = {
        f"{API}/cars/1": list(dealership.CarSchema().fields),
        f"{API}/bookings/1": ["id", "car_id", "customer_name", "customer_email", "start_datetime", "end_datetime",
                              "total_price", "currency"],
        f"{API}/dealers/1": ["id", "name", "location", "turnaround_minutes"],
        f"{API}/cars/1/availability?start_datetime=2035-01-15T00:00:00Z&end_datetime=2035-01-16T00:00:00Z":
            ["car_id", "start_datetime", "end_datetime", "status", "turnaround_minutes", "available", "reason",
             "busy", "maintenance", "free", "held"],
        f"{API}/cars/1/quote?start_datetime=2035-01-15T00:00:00Z&end_datetime=2035-01-16T00:00:00Z":
            ["car_id", "start_datetime", "end_datetime", "days", "daily_price", "total_price", "currency", "available",
             "reason"],
        f"{API}/cars/1/maintenance-windows/1": ["id", "car_id", "start_datetime", "end_datetime", "note"],
        f"{API}/cars/99": ["title", "status", "detail", "request_id"],
        "/health": ["status", "database"] + (["pool"] if TEST_ENGINE == "postgresql" else []),
    }
    for path, names in fields.items():
        text = client.get(path).get_data(as_text=True)
        assert text.endswith("}\n") and not text.endswith("\n\n"), path
        assert list(json.loads(text)) == names, path
    for path in [f"{API}/cars", f"{API}/cars?limit=1", f"{API}/bookings", f"{API}/dealers",
                 f"{API}/bookings/available-cars?start_datetime=2035-02-01T00:00:00Z&end_datetime=2035-02-02T00:00:00Z",
                 f"{API}/cars/1/maintenance-windows"]:
        text = client.get(path).get_data(as_text=True)
        assert text.endswith("]\n") and not text.endswith("\n\n"), path
        assert list(json.loads(text)[0])[0] == "id", path
    text = client.get(f"{API}/bookings/available-slots?duration=PT1H&after=2035-01-15T09:00:00Z").get_data(as_text=True)
    assert text.endswith("]\n") and list(json.loads(text)[0]) == ["car_id", "start_datetime", "end_datetime",
                                                                   "total_price", "currency"]


# ---------------------------------------------------------------------------------------------
# Request bodies and routing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"{bad", b"", b"[1, 2]", b'"text"', b"null", b"12"])
def test_body_that_is_not_a_json_object_is_400(client, data):
    assert_problem(client.post(f"{API}/cars", data=data, content_type="application/json"), 400)
    assert client.get(f"{API}/cars").get_json() == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_body_that_is_not_json_is_415(client, content_type):
    response = client.post(f"{API}/bookings", data=b"car_id=1", content_type=content_type)
    assert_problem(response, 415)


@pytest.mark.parametrize("data", ["[" * 980 + "]" * 980, "[" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000,
                                  '{"brand": ' + "[" * 3000 + "]" * 3000 + "}"])
def test_a_body_nested_however_deep_is_400_not_500(client, data):
    response = client.post(f"{API}/cars", data=data, content_type="application/json")
    assert response.status_code in (400, 422)
    assert_problem(response, response.status_code)
    assert client.get(f"{API}/cars").get_json() == []


def test_a_422_lists_at_most_20_fields_and_says_how_many_more(client):
    response = client.post(f"{API}/cars", json={f"unknown{n:05d}": n for n in range(5000)})
    body = assert_problem(response, 422)
    assert len(body["errors"]) == 20
    assert body["detail"].endswith(" and 4987 more.")  # 5,000 unknown and 7 missing fields, 20 shown
    assert len(response.data) < 3000


def test_body_over_the_limit_is_413(client):
    big = car_body(brand="x" * (1024 * 1024))
    body = assert_problem(client.post(f"{API}/cars", json=big), 413)
    assert "1048576" in body["detail"]
    assert client.get(f"{API}/cars").get_json() == []


def test_body_limit_is_configurable():
    client = new_app({"DEALERSHIP_MAX_CONTENT_LENGTH": 100}).test_client()
    assert_problem(client.post(f"{API}/cars", json=car_body()), 413)


def test_unknown_path_is_json_404(client):
    assert_problem(client.get(f"{API}/trucks"), 404)
    assert_problem(client.get("/nowhere"), 404)


def test_wrong_method_is_json_405(client):
    response = client.patch(f"{API}/cars")
    assert_problem(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


# ---------------------------------------------------------------------------------------------
# Bookings
# ---------------------------------------------------------------------------------------------


def test_create_booking(client):
    make_car(client)
    response = book(client, 1, customer_name="  Ada Lovelace ")
    assert response.status_code == 201
    assert response.headers["Location"] == f"{API}/bookings/1"
    assert response.get_json() == {"id": 1, "car_id": 1, "customer_name": "Ada Lovelace",
                                   "customer_email": "ada@example.com",
                                   "start_datetime": "2035-01-15T10:00:00+00:00",
                                   "end_datetime": "2035-01-15T12:00:00+00:00",
                                   "total_price": 100.0, "currency": "EUR"}
    assert client.get(f"{API}/bookings/1").get_json() == response.get_json()


@pytest.mark.parametrize("field, value", [
    ("customer_name", ""), ("customer_name", "  "), ("customer_name", "x" * 201),
    ("customer_email", "not-an-email"), ("customer_email", ""), ("customer_email", 5),
    ("start_datetime", "tomorrow"), ("start_datetime", "2035-13-01T00:00:00Z"), ("start_datetime", 1700000000),
    ("start_datetime", "9999-12-31T23:00:00-05:00"), ("end_datetime", "0001-01-01T00:00:00+01:00"),
    ("end_datetime", None), ("car_id", "1"), ("car_id", 0), ("id", 3),
])
def test_create_booking_rejects_bad_field(client, field, value):
    make_car(client)
    assert_problem(client.post(f"{API}/bookings", json=booking_body(1) | {field: value}), 422, field)
    assert client.get(f"{API}/bookings").get_json() == []


@pytest.mark.parametrize("field", ["car_id", "customer_name", "customer_email", "start_datetime", "end_datetime"])
def test_create_booking_requires_field(client, field):
    make_car(client)
    body = booking_body(1)
    del body[field]
    assert_problem(client.post(f"{API}/bookings", json=body), 422, field)


@pytest.mark.parametrize("end", ["2035-01-15T10:00:00Z", "2035-01-15T09:00:00Z", "2035-01-15T11:00:00+02:00"])
def test_booking_end_not_after_start_is_422(client, end):
    make_car(client)
    body = assert_problem(book(client, 1, "2035-01-15T10:00:00Z", end), 422, "end_datetime")
    assert "after" in body["errors"]["end_datetime"][0]
    assert client.get(f"{API}/bookings").get_json() == []


def test_booking_unknown_car_is_404(client):
    body = assert_problem(book(client, 7), 404)
    assert "car" in body["detail"] and "7" in body["detail"]


def test_booking_car_in_maintenance_is_409(client):
    make_car(client, status="maintenance")
    body = assert_problem(book(client, 1), 409)
    assert "maintenance" in body["detail"]
    assert client.get(f"{API}/bookings").get_json() == []


def test_overlapping_booking_is_409_naming_the_booking(client):
    make_car(client)
    assert book(client, 1).status_code == 201
    body = assert_problem(book(client, 1, "2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z"), 409)
    assert "booking 1" in body["detail"]
    assert len(client.get(f"{API}/bookings").get_json()) == 1


def test_same_time_on_another_car_is_fine(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    assert book(client, 1).status_code == 201
    assert book(client, 2).status_code == 201


def test_list_bookings_ordered_by_start_then_filtered(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    book(client, 1, "2035-01-03T00:00:00Z", "2035-01-04T00:00:00Z")  # 1
    book(client, 2, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z")  # 2
    book(client, 1, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z")  # 3
    ids = lambda qs="": [b["id"] for b in client.get(f"{API}/bookings?{qs}").get_json()]  # noqa: E731
    assert ids() == [2, 3, 1]
    assert ids("car_id=1") == [3, 1]
    assert ids("car_id=9") == []
    # both bounds: overlapping [start, end); half-open, so touching is not overlapping
    assert ids("start_datetime=2035-01-02T00:00:00Z&end_datetime=2035-01-03T00:00:00Z") == []
    assert ids("start_datetime=2035-01-01T23:00:00Z&end_datetime=2035-01-03T00:00:01Z") == [2, 3, 1]
    # only start: starting at or after it; only end: ending at or before it
    assert ids("start_datetime=2035-01-03T00:00:00Z") == [1]
    assert ids("end_datetime=2035-01-02T00:00:00Z") == [2, 3]
    assert ids("end_datetime=2035-01-01T23:59:59Z") == []


@pytest.mark.parametrize("query_string, name", [
    ("car_id=x", "car_id"), ("start_datetime=soon", "start_datetime"),
    ("start_datetime=2035-01-02T00:00:00Z&end_datetime=2035-01-01T00:00:00Z", "end_datetime"),
    ("customer=bob", "customer"),
])
def test_list_bookings_rejects_bad_query(client, query_string, name):
    assert_problem(client.get(f"{API}/bookings?{query_string}"), 422, name)


def test_get_unknown_booking_is_404(client):
    assert_problem(client.get(f"{API}/bookings/3"), 404)


def test_cancel_booking_frees_its_time(client):
    make_car(client)
    book(client, 1)
    response = client.delete(f"{API}/bookings/1")
    assert response.status_code == 204 and response.data == b""
    assert_problem(client.get(f"{API}/bookings/1"), 404)
    assert book(client, 1).status_code == 201
    assert client.delete(f"{API}/cars/1").status_code == 409  # the new booking still holds it


def test_cancel_unknown_booking_is_404(client):
    assert_problem(client.delete(f"{API}/bookings/1"), 404)


# ---------------------------------------------------------------------------------------------
# Time rules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start, stored", [
    ("2035-01-15T10:00:00Z", "2035-01-15T10:00:00+00:00"),
    ("2035-01-15T10:00:00+02:00", "2035-01-15T08:00:00+00:00"),
    ("2035-01-15T10:00:00-05:30", "2035-01-15T15:30:00+00:00"),
    ("2035-01-15T10:00:00", "2035-01-15T10:00:00+00:00"),  # no offset: UTC
    ("2035-01-15T10:00:00.250Z", "2035-01-15T10:00:00.250000+00:00"),
])
def test_datetimes_are_stored_and_shown_in_utc(client, start, stored):
    make_car(client)
    response = book(client, 1, start, "2035-01-16T00:00:00Z")
    assert response.status_code == 201
    assert response.get_json()["start_datetime"] == stored


@pytest.mark.parametrize("start, stored", [
    ("2035-06-01T09:00:00Z", "2035-06-01T09:00:00+00:00"), ("2035-06-01t09:00:00z", "2035-06-01T09:00:00+00:00"),
    ("2035-06-01T09:00:00.5+02:00", "2035-06-01T07:00:00.500000+00:00"),
    ("2035-06-01T09:00:00.123456-05:30", "2035-06-01T14:30:00.123456+00:00"), ("2035-06-01T09:00:00", "2035-06-01T09:00:00+00:00")])
def test_rfc_3339_date_times_are_accepted(client, start, stored):
    make_car(client)
    response = book(client, 1, start, "2035-06-02T09:00:00Z")
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["start_datetime"] == stored


@pytest.mark.parametrize("start", ["2035-W22-5", "20350601T090000Z", "2035-06-01T09Z", "2035-06-01T09:00Z", "2035-06-01",
                                   "2035-06-01T09:00:00,5Z", "2035-06-01T09:00:00+02:00:30", "2035-06-01T09:00:00.123456789Z",
                                   "2035-06-01 09:00:00Z", "2035-06-01T09:00:00+0200", "2035-06-31T09:00:00Z",
                                   "2035-06-01T09:00:00 02:00", " 2035-06-01T09:00:00Z", "2035-06-01T25:00:00Z", 20350601])
def test_other_date_time_forms_are_422_showing_the_form_to_use(client, start):
    make_car(client)
    body = assert_problem(book(client, 1, start, "2035-06-02T09:00:00Z"), 422, "start_datetime")
    assert "2030-06-01T09:00:00+02:00" in body["errors"]["start_datetime"][0]
    assert client.get(f"{API}/bookings").get_json() == []


def test_an_unencoded_plus_is_read_as_a_plus_in_query_strings_only(client):
    make_car(client)
    assert_problem(book(client, 1, "2035-06-01T09:00:00 02:00", "2035-06-02T09:00:00Z"), 422, "start_datetime")
    response = client.get(f"{API}/bookings/available-cars?start_datetime=2035-06-01T09:00:00 02:00"
                          "&end_datetime=2035-06-01T10:00:00 02:00")
    assert response.status_code == 200 and len(response.get_json()) == 1


def test_same_instant_written_two_ways_clashes(client):
    make_car(client)
    assert book(client, 1, "2035-01-15T10:00:00+02:00", "2035-01-15T12:00:00+02:00").status_code == 201
    assert_problem(book(client, 1, "2035-01-15T08:00:00Z", "2035-01-15T09:00:00Z"), 409)
    assert_problem(book(client, 1, "2035-01-15T09:59:59", "2035-01-15T10:00:00"), 409)  # naive is UTC


def test_back_to_back_bookings_do_not_overlap(client):
    make_car(client)
    assert book(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z").status_code == 201
    assert book(client, 1, "2035-01-15T12:00:00Z", "2035-01-15T14:00:00Z").status_code == 201
    assert book(client, 1, "2035-01-15T08:00:00Z", "2035-01-15T10:00:00Z").status_code == 201
    # the same edge written in another offset: 16:00+02:00 is 14:00Z
    assert book(client, 1, "2035-01-15T16:00:00+02:00", "2035-01-15T15:00:00Z").status_code == 201


@pytest.mark.parametrize("start, end", [
    ("2035-01-15T11:59:59Z", "2035-01-15T14:00:00Z"),  # one second into the end
    ("2035-01-15T08:00:00Z", "2035-01-15T10:00:01Z"),  # one second into the start
    ("2035-01-15T10:30:00Z", "2035-01-15T11:00:00Z"),  # inside
    ("2035-01-15T09:00:00Z", "2035-01-15T13:00:00Z"),  # around
])
def test_overlap_by_one_second_or_more_is_refused(client, start, end):
    make_car(client)
    book(client, 1)
    assert_problem(book(client, 1, start, end), 409)


def from_now(**delta):
    """An instant relative to now, as ISO 8601 with an offset."""
    return (datetime.now(timezone.utc) + timedelta(**delta)).replace(microsecond=0).isoformat()


def test_a_booking_cannot_start_in_the_past(client):
    make_car(client)
    body = assert_problem(book(client, 1, from_now(hours=-2), from_now(hours=2)), 422, "start_datetime")
    assert "in the past" in body["errors"]["start_datetime"][0]
    assert client.get(f"{API}/bookings").get_json() == []
    assert book(client, 1, from_now(seconds=-30), from_now(hours=2)).status_code == 201  # a minute's tolerance
    assert book(client, 1, from_now(days=1), from_now(days=2)).get_json()["id"] == 2  # the refusal used no id


def test_a_booking_cannot_be_moved_into_the_past(client):
    make_car(client)
    booked = book(client, 1, from_now(days=1), from_now(days=2)).get_json()
    assert_problem(patch_booking(client, 1, start_datetime=from_now(days=-1)), 422, "start_datetime")
    assert client.get(f"{API}/bookings/1").get_json() == booked


def test_a_running_booking_may_change_its_end_and_car_and_be_cancelled(database):
    client = on_file(database).test_client()
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    now = datetime.now(timezone.utc)
    insert_booking(database, 1, now - timedelta(days=1), now + timedelta(days=1))  # booked yesterday, running now
    running = on_file(database).test_client()
    new_end = from_now(days=3)
    assert patch_booking(running, 1, end_datetime=new_end).status_code == 200
    assert patch_booking(running, 1, car_id=2).status_code == 200
    assert_problem(patch_booking(running, 1, start_datetime=from_now(hours=-1)), 422, "start_datetime")
    assert running.get(f"{API}/bookings/1").get_json()["car_id"] == 2
    assert running.delete(f"{API}/bookings/1").status_code == 204


# ---------------------------------------------------------------------------------------------
# Available cars
# ---------------------------------------------------------------------------------------------


def test_available_cars(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    make_car(client, vin=vin(3), status="maintenance")
    make_car(client, vin=vin(4))
    book(client, 2, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")
    url = f"{API}/bookings/available-cars"
    response = client.get(url, query_string=window("2035-01-15T11:00:00Z", "2035-01-15T11:30:00Z"))
    assert response.status_code == 200
    assert [car["id"] for car in response.get_json()] == [1, 4]
    assert response.get_json()[0] == client.get(f"{API}/cars/1").get_json()
    touching = window("2035-01-15T12:00:00Z", "2035-01-15T13:00:00Z")
    assert [car["id"] for car in client.get(url, query_string=touching).get_json()] == [1, 2, 4]


def test_available_cars_accepts_an_unencoded_plus_in_the_offset(client):
    make_car(client)
    book(client, 1, "2035-01-15T08:00:00Z", "2035-01-15T09:00:00Z")
    url = f"{API}/bookings/available-cars?start_datetime=2035-01-15T10:00:00+02:00&end_datetime=2035-01-15T11:00:00+02:00"
    assert client.get(url).get_json() == []


@pytest.mark.parametrize("params, name", [
    ({}, "start_datetime"),
    ({"start_datetime": "2035-01-15T11:00:00Z"}, "end_datetime"),
    (window("yesterday", "2035-01-15T11:00:00Z"), "start_datetime"),
    (window("2035-01-15T11:00:00Z", "2035-01-15T11:00:00Z"), "end_datetime"),
    (window("2035-01-15T11:00:00Z", "2035-01-15T10:00:00Z"), "end_datetime"),
    (window("2035-01-15T11:00:00Z", "9999-12-31T23:00:00-05:00"), "end_datetime"),
    (window("2035-01-15T11:00:00Z", "2035-01-15T12:00:00Z") | {"foo": "1"}, "foo"),
])
def test_available_cars_rejects_bad_window(client, params, name):
    assert_problem(client.get(f"{API}/bookings/available-cars", query_string=params), 422, name)


# ---------------------------------------------------------------------------------------------
# Concurrency: the overlap check and the insert are one step
# ---------------------------------------------------------------------------------------------


def run_at_once(n, action):
    barrier = threading.Barrier(n)
    results = [None] * n

    def worker(i):
        barrier.wait()
        results[i] = action(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_200_threads_booking_one_slot_get_one_201(app):
    app.test_client().post(f"{API}/cars", json=car_body())
    statuses = run_at_once(200, lambda i: book(app.test_client(), 1).status_code)
    assert sorted(statuses) == [201] + [409] * 199
    assert len(app.test_client().get(f"{API}/bookings").get_json()) == 1


def test_two_cars_created_at_once_with_one_vin_get_one_201(app):
    for _ in range(20):
        statuses = run_at_once(2, lambda i: app.test_client().post(f"{API}/cars", json=car_body()).status_code)
        assert sorted(statuses) == [201, 409]
        cars = app.test_client().get(f"{API}/cars").get_json()
        assert len(cars) == 1
        assert app.test_client().delete(f"{API}/cars/{cars[0]['id']}").status_code == 204


# ---------------------------------------------------------------------------------------------
# Operations: maintenance windows, turnaround, prices, and the earliest free slot
# ---------------------------------------------------------------------------------------------


def open_window(client, car_id, start, end, **fields):
    return client.post(f"{API}/cars/{car_id}/maintenance-windows", json=window(start, end) | fields)


def set_turnaround(client, minutes, dealer_id=1):
    response = client.patch(f"{API}/dealers/{dealer_id}", json={"turnaround_minutes": minutes})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_a_maintenance_window_is_created_listed_read_and_removed(client):
    make_car(client)
    response = open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z", note=" Brake check ")
    assert response.status_code == 201
    assert response.headers["Location"] == f"{API}/cars/1/maintenance-windows/1"
    made = {"id": 1, "car_id": 1, "start_datetime": "2035-01-20T08:00:00+00:00",
            "end_datetime": "2035-01-20T12:00:00+00:00", "note": "Brake check"}
    assert response.get_json() == made
    assert client.get(f"{API}/cars/1/maintenance-windows/1").get_json() == made
    second = open_window(client, 1, "2035-01-10T08:00:00Z", "2035-01-10T09:00:00Z").get_json()
    assert second["note"] == ""
    listed = client.get(f"{API}/cars/1/maintenance-windows")
    assert listed.headers["X-Total-Count"] == "2"
    assert [w["id"] for w in listed.get_json()] == [2, 1]  # in time order
    assert [w["id"] for w in client.get(f"{API}/cars/1/maintenance-windows?limit=1&offset=1").get_json()] == [1]
    assert client.delete(f"{API}/cars/1/maintenance-windows/1").status_code == 204
    assert_problem(client.get(f"{API}/cars/1/maintenance-windows/1"), 404)
    assert [w["id"] for w in client.get(f"{API}/cars/1/maintenance-windows").get_json()] == [2]
    assert book(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z").status_code == 201  # free again


def test_a_window_belongs_to_its_car_and_an_unknown_car_has_none(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z")
    assert "Car 2 has no maintenance window with id 1" in assert_problem(
        client.get(f"{API}/cars/2/maintenance-windows/1"), 404)["detail"]
    assert_problem(client.delete(f"{API}/cars/2/maintenance-windows/1"), 404)
    assert "no car with id 9" in assert_problem(client.get(f"{API}/cars/9/maintenance-windows"), 404)["detail"]
    assert "no car with id 9" in assert_problem(client.get(f"{API}/cars/9/maintenance-windows/1"), 404)["detail"]
    assert len(client.get(f"{API}/cars/1/maintenance-windows").get_json()) == 1


@pytest.mark.parametrize("body, name", [
    (window("2035-01-20T12:00:00Z", "2035-01-20T08:00:00Z"), "end_datetime"),
    (window("2035-01-20T12:00:00Z", "2035-01-20T12:00:00Z"), "end_datetime"),
    ({"end_datetime": "2035-01-20T12:00:00Z"}, "start_datetime"),
    (window("2035-01-20T08:00:00Z", "soon"), "end_datetime"),
    (window("2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z") | {"note": "x" * 201}, "note"),
    (window("2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z") | {"note": "a\nb"}, "note"),
    (window("2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z") | {"car_id": 1}, "car_id"),
    (window("2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z") | {"id": 4}, "id"),
])
def test_a_bad_window_is_422_naming_the_field(client, body, name):
    make_car(client)
    assert_problem(client.post(f"{API}/cars/1/maintenance-windows", json=body), 422, name)
    assert client.get(f"{API}/cars/1/maintenance-windows").get_json() == []


def test_a_window_cannot_start_in_the_past(client):
    make_car(client)
    start, end = from_now(hours=-2), from_now(hours=2)
    assert_problem(open_window(client, 1, start, end), 422, "start_datetime")
    assert open_window(client, 1, from_now(minutes=1), end).status_code == 201


def test_a_booking_over_a_window_is_409_naming_the_window(client):
    make_car(client)
    open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z", note="Brake check")
    body = assert_problem(book(client, 1, "2035-01-20T11:00:00Z", "2035-01-20T15:00:00Z"), 409)
    assert body["detail"] == ("Car 1 is in maintenance from 2035-01-20T08:00:00+00:00 to 2035-01-20T12:00:00+00:00: "
                              "maintenance window 1 (Brake check).")
    # half-open: back to back with the window is fine without turnaround
    assert book(client, 1, "2035-01-20T12:00:00Z", "2035-01-20T15:00:00Z").status_code == 201
    assert book(client, 1, "2035-01-20T06:00:00Z", "2035-01-20T08:00:00Z").status_code == 201
    # and a move onto the window is refused, leaving the booking as it was
    assert_problem(patch_booking(client, 1, start_datetime="2035-01-20T10:00:00Z"), 409)
    assert client.get(f"{API}/bookings/1").get_json()["start_datetime"] == "2035-01-20T12:00:00+00:00"


def test_a_window_over_bookings_is_409_naming_ten_of_them_and_the_count(client):
    make_car(client)
    for hour in range(12):
        assert book(client, 1, f"2035-01-20T{hour:02}:00:00Z", f"2035-01-20T{hour:02}:30:00Z").status_code == 201
    body = assert_problem(open_window(client, 1, "2035-01-20T00:15:00Z", "2035-01-21T00:00:00Z"), 409)
    assert body["detail"].startswith("The window would hit 12 bookings of car 1")
    for booking_id in range(1, 11):
        assert f"{booking_id} (2035-01-20T{booking_id - 1:02}:00:00+00:00 to " in body["detail"]
    assert "11 (" not in body["detail"] and "and 2 more" in body["detail"]
    assert client.get(f"{API}/cars/1/maintenance-windows").get_json() == []
    body = assert_problem(open_window(client, 1, "2035-01-20T11:15:00Z", "2035-01-20T13:00:00Z"), 409)
    assert "hit 1 booking of car 1" in body["detail"] and "12 (2035-01-20T11:00:00+00:00" in body["detail"]


def test_windows_may_not_overlap_each_other(client):
    make_car(client)
    open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z")
    body = assert_problem(open_window(client, 1, "2035-01-20T10:00:00Z", "2035-01-20T14:00:00Z"), 409)
    assert "maintenance window 1" in body["detail"]
    assert open_window(client, 1, "2035-01-20T12:00:00Z", "2035-01-20T14:00:00Z").status_code == 201


def test_a_car_in_maintenance_status_may_get_windows_and_deleting_a_car_removes_them(client):
    make_car(client, status="maintenance")
    assert open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z").status_code == 201
    assert client.delete(f"{API}/cars/1").status_code == 204
    assert_problem(client.get(f"{API}/cars/1/maintenance-windows"), 404)
    make_car(client)
    assert client.get(f"{API}/cars/2/maintenance-windows").get_json() == []
    assert open_window(client, 2, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z").get_json()["id"] == 2


def test_windows_and_turnaround_shape_available_cars_and_the_calendar(client):
    set_turnaround(client, 60)
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    book(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    open_window(client, 2, "2035-01-20T14:00:00Z", "2035-01-20T16:00:00Z", note="Tyres")

    def free(start, end):
        return [car["id"] for car in client.get(f"{API}/bookings/available-cars",
                                                 query_string=window(start, end)).get_json()]

    assert free("2035-01-20T10:00:00Z", "2035-01-20T11:00:00Z") == [2]  # car 1 is being cleaned
    assert free("2035-01-20T11:00:00Z", "2035-01-20T12:00:00Z") == [1, 2]
    assert free("2035-01-20T12:00:00Z", "2035-01-20T13:30:00Z") == [1]  # car 2 must be ready for the workshop
    assert free("2035-01-20T15:00:00Z", "2035-01-20T16:00:00Z") == [1]
    assert free("2035-01-20T17:00:00Z", "2035-01-20T18:00:00Z") == [1, 2]
    body = calendar(client, 2, "2035-01-20T00:00:00Z", "2035-01-21T00:00:00Z").get_json()
    assert body["turnaround_minutes"] == 60 and body["available"] is False and body["busy"] == []
    assert body["maintenance"] == [{"window_id": 1, "start_datetime": "2035-01-20T14:00:00+00:00",
                                    "end_datetime": "2035-01-20T16:00:00+00:00", "note": "Tyres"}]
    assert body["free"] == [
        {"start_datetime": "2035-01-20T00:00:00+00:00", "end_datetime": "2035-01-20T13:00:00+00:00"},
        {"start_datetime": "2035-01-20T17:00:00+00:00", "end_datetime": "2035-01-21T00:00:00+00:00"}]
    # a booking whose turnaround reaches into the period narrows its free gap, though it is not busy in it
    body = calendar(client, 1, "2035-01-20T10:00:00Z", "2035-01-20T12:00:00Z").get_json()
    assert body["busy"] == [] and body["available"] is False
    assert body["free"] == [{"start_datetime": "2035-01-20T11:00:00+00:00", "end_datetime": "2035-01-20T12:00:00+00:00"}]


def test_turnaround_refuses_back_to_back_bookings_and_says_when_the_car_is_ready(client):
    make_car(client)
    book(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    assert book(client, 1, "2035-01-20T10:00:00Z", "2035-01-20T11:00:00Z").status_code == 201  # no turnaround yet
    client.delete(f"{API}/bookings/2")
    assert set_turnaround(client, 60) == {"id": 1, "name": "Oscar Mobility Main", "location": "Munich, Germany",
                                          "turnaround_minutes": 60}
    body = assert_problem(book(client, 1, "2035-01-20T10:00:00Z", "2035-01-20T11:00:00Z"), 409)
    assert body["detail"] == ("Car 1 is not ready until 2035-01-20T11:00:00+00:00: booking 1 ends at "
                              "2035-01-20T10:00:00+00:00, and dealer 1 needs 60 minutes of turnaround between two "
                              "entries of a car's schedule.")
    body = assert_problem(book(client, 1, "2035-01-20T06:00:00Z", "2035-01-20T07:30:00Z"), 409)
    assert body["detail"].startswith("Car 1 must be back by 2035-01-20T07:00:00+00:00, ready for booking 1 at "
                                     "2035-01-20T08:00:00+00:00")
    assert book(client, 1, "2035-01-20T11:00:00Z", "2035-01-20T12:00:00Z").status_code == 201
    assert book(client, 1, "2035-01-20T06:00:00Z", "2035-01-20T07:00:00Z").status_code == 201


def test_turnaround_between_a_booking_and_a_window_both_ways(client):
    set_turnaround(client, 30)
    make_car(client)
    book(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    body = assert_problem(open_window(client, 1, "2035-01-20T10:15:00Z", "2035-01-20T12:00:00Z"), 409)
    assert "hit 1 booking" in body["detail"] and "30 minutes of turnaround" in body["detail"]
    assert open_window(client, 1, "2035-01-20T10:30:00Z", "2035-01-20T12:00:00Z").status_code == 201
    body = assert_problem(book(client, 1, "2035-01-20T12:10:00Z", "2035-01-20T13:00:00Z"), 409)
    assert "not ready until 2035-01-20T12:30:00+00:00: maintenance window 1 ends at" in body["detail"]
    assert book(client, 1, "2035-01-20T12:30:00Z", "2035-01-20T13:00:00Z").status_code == 201


def test_a_change_of_turnaround_keeps_existing_bookings_and_applies_to_moves(client):
    make_car(client)
    book(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    book(client, 1, "2035-01-20T10:00:00Z", "2035-01-20T11:00:00Z")
    set_turnaround(client, 120)
    assert len(client.get(f"{API}/bookings").get_json()) == 2  # still valid, still there
    assert patch_booking(client, 2, customer_name="Grace Hopper").status_code == 200  # not a move
    assert_problem(patch_booking(client, 2, end_datetime="2035-01-20T11:30:00Z"), 409)  # a move is checked
    assert patch_booking(client, 2, start_datetime="2035-01-20T12:00:00Z",
                         end_datetime="2035-01-20T13:00:00Z").status_code == 200
    other = client.post(f"{API}/dealers", json={"name": "North", "turnaround_minutes": 15}).get_json()
    assert other["turnaround_minutes"] == 15
    make_car(client, vin=vin(2), dealer_id=other["id"])
    book(client, 2, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    assert book(client, 2, "2035-01-20T10:15:00Z", "2035-01-20T11:00:00Z").status_code == 201


@pytest.mark.parametrize("body, name", [({"turnaround_minutes": 1441}, "turnaround_minutes"),
                                        ({"turnaround_minutes": -1}, "turnaround_minutes"),
                                        ({"turnaround_minutes": "60"}, "turnaround_minutes"),
                                        ({"turnaround_minutes": 1.5}, "turnaround_minutes"),
                                        ({"turnaround_minutes": None}, "turnaround_minutes"),
                                        ({"name": " "}, "name"), ({"id": 3}, "id")])
def test_a_bad_change_of_a_dealer_is_422_and_changes_nothing(client, body, name):
    assert_problem(client.patch(f"{API}/dealers/1", json=body), 422, name)
    assert client.get(f"{API}/dealers/1").get_json()["turnaround_minutes"] == 0
    assert_problem(client.post(f"{API}/dealers", json={"name": "A"} | body), 422, name)


def test_a_dealer_changes_only_what_is_given(client):
    response = client.patch(f"{API}/dealers/1", json={"name": " Main ", "turnaround_minutes": 1440})
    assert response.get_json() == {"id": 1, "name": "Main", "location": "Munich, Germany", "turnaround_minutes": 1440}
    assert client.patch(f"{API}/dealers/1", json={}).get_json()["turnaround_minutes"] == 1440
    assert_problem(client.patch(f"{API}/dealers/9", json={}), 404)


@pytest.mark.parametrize("length, days, price", [
    (timedelta(minutes=1), 1, 100.0), (timedelta(hours=23, minutes=59), 1, 100.0), (timedelta(hours=24), 1, 100.0),
    (timedelta(hours=24, minutes=1), 2, 200.0), (timedelta(days=3), 3, 300.0), (timedelta(days=3, seconds=1), 4, 400.0),
])
def test_a_booking_costs_the_daily_price_per_started_day(client, length, days, price):
    make_car(client)
    start = datetime(2035, 1, 20, 9, tzinfo=timezone.utc)
    body = book(client, 1, start.isoformat(), (start + length).isoformat()).get_json()
    assert (body["total_price"], body["currency"]) == (price, "EUR")
    quote = client.get(f"{API}/cars/1/quote", query_string=window(start.isoformat(), (start + length).isoformat()))
    assert (quote.get_json()["days"], quote.get_json()["total_price"]) == (days, price)


def test_prices_are_decimal_and_rounded_half_up_to_cents(client):
    make_car(client, daily_price=33.335)
    assert book(client, 1, "2035-01-20T09:00:00Z", "2035-01-23T09:00:00Z").get_json()["total_price"] == 100.01
    make_car(client, vin=vin(2), daily_price=0.1)
    assert book(client, 2, "2035-01-20T09:00:00Z", "2035-01-23T09:00:00Z").get_json()["total_price"] == 0.3


def test_a_price_is_fixed_when_booked_and_set_again_only_by_a_move(client):
    make_car(client, vin=vin(1), daily_price=50.0)
    make_car(client, vin=vin(2), daily_price=80.0)
    book(client, 1, "2035-01-20T09:00:00Z", "2035-01-22T09:00:00Z")
    assert client.patch(f"{API}/cars/1", json={"daily_price": 70.0}).status_code == 200
    assert client.get(f"{API}/bookings/1").get_json()["total_price"] == 100.0  # as booked
    assert patch_booking(client, 1, customer_name="Grace").get_json()["total_price"] == 100.0  # not a move
    assert patch_booking(client, 1, end_datetime="2035-01-23T09:00:00Z").get_json()["total_price"] == 210.0
    assert patch_booking(client, 1, car_id=2).get_json()["total_price"] == 240.0
    assert_problem(patch_booking(client, 1, car_id=9), 404)
    assert client.get(f"{API}/bookings/1").get_json()["total_price"] == 240.0


def test_the_currency_is_configurable_and_shown_beside_every_price():
    client = new_app({"DEALERSHIP_CURRENCY": "usd"}).test_client()
    assert make_car(client)["currency"] == "USD"
    assert book(client, 1).get_json()["currency"] == "USD"
    assert client.get(f"{API}/cars/1/quote", query_string=window("2035-02-01T09:00:00Z", "2035-02-02T09:00:00Z")
                      ).get_json()["currency"] == "USD"
    for bad in ["EURO", "E1R", "", "€"]:
        with pytest.raises(dealership.ConfigError, match="DEALERSHIP_CURRENCY"):
            new_app({"DEALERSHIP_CURRENCY": bad})


def test_a_quote_prices_without_booking_and_says_whether_the_car_is_free(client):
    make_car(client, daily_price=64.5)
    period = window("2035-01-20T09:00:00+01:00", "2035-01-22T10:00:00+01:00")
    response = client.get(f"{API}/cars/1/quote", query_string=period)
    assert response.get_json() == {"car_id": 1, "start_datetime": "2035-01-20T08:00:00+00:00",
                                   "end_datetime": "2035-01-22T09:00:00+00:00", "days": 3, "daily_price": 64.5,
                                   "total_price": 193.5, "currency": "EUR", "available": True, "reason": None}
    assert client.get(f"{API}/bookings").get_json() == []
    book(client, 1, "2035-01-21T09:00:00Z", "2035-01-21T10:00:00Z")
    quoted = client.get(f"{API}/cars/1/quote", query_string=period).get_json()
    assert quoted["available"] is False
    assert quoted["reason"] == ("Car 1 is already booked from 2035-01-21T09:00:00+00:00 to "
                                "2035-01-21T10:00:00+00:00 by booking 1.")
    assert_problem(client.get(f"{API}/cars/9/quote", query_string=period), 404)
    assert_problem(client.get(f"{API}/cars/1/quote", query_string=window("2035-01-22T09:00:00Z",
                                                                         "2035-01-20T09:00:00Z")), 422, "end_datetime")
    assert_problem(client.get(f"{API}/cars/1/quote"), 422, "start_datetime", "end_datetime")


def test_a_period_that_starts_in_the_past_is_not_available_and_says_why(client):
    """`available` means a booking made now would be accepted: not for a period that has begun."""
    make_car(client)
    past = window(from_now(hours=-3), from_now(hours=3))
    for path in (f"{API}/cars/1/quote", f"{API}/cars/1/availability"):
        body = client.get(path, query_string=past).get_json()
        assert body["available"] is False, path
        assert body["reason"].startswith("Is in the past: a booking can start from now on ("), path
        [refusal] = assert_problem(book(client, 1, *past.values()), 422, "start_datetime")["errors"]["start_datetime"]
        assert refusal.partition("(")[0] == body["reason"].partition("(")[0], path  # the same words, to the second
    berlin = new_app({"DEALERSHIP_TIMEZONE": "Europe/Berlin"}).test_client()
    make_car(berlin)
    reason = berlin.get(f"{API}/cars/1/quote", query_string=past).get_json()["reason"]
    assert re.search(r"\+0[12]:00\)\.$", reason), reason  # now, in the dealership's zone like every instant
    client.patch(f"{API}/cars/1", json={"status": "maintenance"})
    future = window(from_now(days=3), from_now(days=4))
    body = client.get(f"{API}/cars/1/quote", query_string=future).get_json()
    assert (body["available"], body["reason"]) == (False, "Car 1 is in maintenance and cannot be booked.")


def slots(client, **query):
    response = client.get(f"{API}/bookings/available-slots", query_string=query)
    assert response.status_code == 200, response.get_json()
    return response


def test_available_slots_finds_each_cars_earliest_free_period(client):
    set_turnaround(client, 60)
    north = client.post(f"{API}/dealers", json={"name": "North"}).get_json()["id"]
    make_car(client, vin=vin(1), brand="Toyota")
    make_car(client, vin=vin(2), brand="Skoda", daily_price=50.0)
    make_car(client, vin=vin(3), brand="Skoda", dealer_id=north)
    make_car(client, vin=vin(4), status="maintenance")
    book(client, 1, "2035-01-20T09:00:00Z", "2035-01-22T09:00:00Z")
    book(client, 1, "2035-01-24T09:00:00Z", "2035-01-25T09:00:00Z")  # the gap between is too short for 3 days
    open_window(client, 2, "2035-01-20T08:00:00Z", "2035-01-20T20:00:00Z")
    response = slots(client, duration="P3D", after="2035-01-20T09:00:00Z")
    assert response.headers["X-Total-Count"] == "3"
    assert response.get_json() == [
        {"car_id": 3, "start_datetime": "2035-01-20T09:00:00+00:00", "end_datetime": "2035-01-23T09:00:00+00:00",
         "total_price": 300.0, "currency": "EUR"},
        {"car_id": 2, "start_datetime": "2035-01-20T21:00:00+00:00", "end_datetime": "2035-01-23T21:00:00+00:00",
         "total_price": 150.0, "currency": "EUR"},
        {"car_id": 1, "start_datetime": "2035-01-25T10:00:00+00:00", "end_datetime": "2035-01-28T10:00:00+00:00",
         "total_price": 300.0, "currency": "EUR"},
    ]
    # a shorter stay fits into car 1's gap, with its hour of turnaround on both sides
    assert slots(client, duration="P1DT22H", after="2035-01-20T09:00:00Z", car_id=1).get_json()[0][
        "start_datetime"] == "2035-01-22T10:00:00+00:00"
    assert slots(client, duration="P1DT22H1M", after="2035-01-20T09:00:00Z", car_id=1).get_json()[0][
        "start_datetime"] == "2035-01-25T10:00:00+00:00"
    assert [s["car_id"] for s in slots(client, duration="P3D", after="2035-01-20T09:00:00Z", brand="skoda").get_json()] == [3, 2]
    assert [s["car_id"] for s in slots(client, duration="P3D", after="2035-01-20T09:00:00Z",
                                       dealer_id=1).get_json()] == [2, 1]
    paged = slots(client, duration="P3D", after="2035-01-20T09:00:00Z", limit=1, offset=1)
    assert [s["car_id"] for s in paged.get_json()] == [2] and 'rel="next"' in paged.headers["Link"]
    # `before` leaves out a car whose earliest slot ends later
    assert [s["car_id"] for s in slots(client, duration="P3D", after="2035-01-20T09:00:00Z",
                                       before="2035-01-27T00:00:00Z").get_json()] == [3, 2]
    # booking a returned slot succeeds
    for slot in response.get_json():
        assert book(client, slot["car_id"], slot["start_datetime"], slot["end_datetime"]).status_code == 201


def test_available_slots_start_no_earlier_than_now_and_look_90_days_ahead_by_default(client):
    make_car(client)
    before = datetime.now(timezone.utc)
    first = slots(client, duration="PT4H").get_json()[0]
    start = datetime.fromisoformat(first["start_datetime"])
    assert before <= start <= datetime.now(timezone.utc) + timedelta(minutes=1)
    assert start.second == start.microsecond == 0  # the next whole minute
    assert book(client, 1, first["start_datetime"], first["end_datetime"]).status_code == 201
    past = slots(client, duration="PT4H", after=(before - timedelta(days=3)).isoformat()).get_json()[0]
    assert datetime.fromisoformat(past["start_datetime"]) >= datetime.fromisoformat(first["end_datetime"])
    # a car booked for the next 90 days has no slot in the default search, but one after it
    far = (before + timedelta(days=100)).replace(microsecond=0)
    assert book(client, 1, first["end_datetime"], (before + timedelta(days=95)).isoformat()).status_code == 201
    assert slots(client, duration="PT4H").get_json() == []
    assert slots(client, duration="PT4H", before=far.isoformat()).get_json()[0]["car_id"] == 1


@pytest.mark.parametrize("query, name", [
    ({}, "duration"), ({"duration": "P1W"}, "duration"), ({"duration": "PT10M"}, "duration"),
    ({"duration": "P91D"}, "duration"), ({"duration": "3 days"}, "duration"), ({"duration": "P1DT"}, "duration"),
    ({"duration": "PT1H30S"}, "duration"), ({"duration": "P1.5D"}, "duration"), ({"duration": "p3d"}, "duration"),
    ({"duration": "P3D", "after": "2035-01-20T09:00:00Z", "before": "2035-01-20T09:00:00Z"}, "before"),
    ({"duration": "P3D", "after": "tomorrow"}, "after"), ({"duration": "P3D", "car_id": "0"}, "car_id"),
    ({"duration": "P3D", "limit": "0"}, "limit"), ({"duration": "P3D", "color": "red"}, "color"),
])
def test_a_bad_slot_search_is_422_with_an_example(client, query, name):
    body = assert_problem(client.get(f"{API}/bookings/available-slots", query_string=query), 422, name)
    if name == "duration" and query:
        assert "such as P3D" in body["errors"]["duration"][0]


def test_available_slots_reach_the_end_of_the_calendar_without_error(client):
    make_car(client)
    assert slots(client, duration="P90D", after="9998-12-30T00:00:00Z").get_json() == []
    assert len(slots(client, duration="P1D", after="9998-12-01T00:00:00Z").get_json()) == 1
    assert slots(client, duration="P1D", after="9999-12-31T00:00:00-05:00").get_json() == []


def earliest_by_brute_force(entries, pad, after, before, length):
    """The earliest start at or after `after`: either `after` itself or the end of an entry plus the
    pad, whichever first leaves [start, start + length) clear of every entry widened by the pad."""
    candidates = sorted({after} | {end + pad for _, end in entries if end + pad > after})
    for start in candidates:
        if start + length <= before and all(not (s - pad < start + length and start < e + pad) for s, e in entries):
            return start
    return None


def test_slot_search_matches_a_brute_force_oracle_over_random_schedules():
    rng = random.Random(20261125)
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    for round_ in range(300):
        client = new_app({"DEALERSHIP_DATABASE": ":memory:"}).test_client()  # the fleet's search, on any engine
        turnaround = rng.choice([0, 0, 15, 60, 240])
        set_turnaround(client, turnaround)
        cars = [make_car(client, vin=vin(n), daily_price=10.0 + n)["id"] for n in range(rng.randrange(1, 7))]
        entries = {car_id: [] for car_id in cars}
        for _ in range(rng.randrange(0, 12)):
            car_id = rng.choice(cars)
            start = base + timedelta(minutes=15 * rng.randrange(0, 4 * 24 * 10))
            end = start + timedelta(minutes=15 * rng.randrange(1, 4 * 36))
            response = open_window(client, car_id, start.isoformat(), end.isoformat()) if rng.random() < 0.3 else \
                book(client, car_id, start.isoformat(), end.isoformat())
            if response.status_code == 201:
                entries[car_id].append((start, end))
        after = base + timedelta(minutes=15 * rng.randrange(0, 4 * 24 * 10))
        before = after + timedelta(hours=rng.randrange(1, 24 * 12))
        length = timedelta(minutes=15 * rng.randrange(1, 4 * 24 * 3))
        pad = timedelta(minutes=turnaround)
        expected = sorted((start, car_id) for car_id in cars
                          if (start := earliest_by_brute_force(entries[car_id], pad, after, before, length)))
        duration = f"P{length.days}DT{length.seconds // 60}M" if length.days else f"PT{length.seconds // 60}M"
        found = slots(client, duration=duration, after=after.isoformat(), before=before.isoformat()).get_json()
        assert [(datetime.fromisoformat(s["start_datetime"]), s["car_id"]) for s in found] == expected, round_
        # a page is that part of the whole answer, however it falls between cars free at once and later ones
        offset, limit = rng.randrange(0, len(cars) + 1), rng.randrange(1, len(cars) + 1)
        page = slots(client, duration=duration, after=after.isoformat(), before=before.isoformat(),
                     offset=offset, limit=limit)
        assert page.get_json() == found[offset:offset + limit], round_
        assert page.headers["X-Total-Count"] == str(len(expected)), round_
        for slot in found:
            assert datetime.fromisoformat(slot["end_datetime"]) - datetime.fromisoformat(slot["start_datetime"]) == length
            assert book(client, slot["car_id"], slot["start_datetime"], slot["end_datetime"]).status_code == 201


def test_windows_and_turnaround_cross_between_two_apps_on_one_file(database):
    first, second = on_file(database).test_client(), on_file(database).test_client()
    make_car(first)
    assert open_window(first, 1, "2035-01-20T08:00:00Z", "2035-01-20T12:00:00Z").status_code == 201
    assert_problem(book(second, 1, "2035-01-20T11:00:00Z", "2035-01-20T13:00:00Z"), 409)
    assert second.get(f"{API}/cars/1/maintenance-windows/1").status_code == 200
    set_turnaround(second, 60)
    assert_problem(book(first, 1, "2035-01-20T12:30:00Z", "2035-01-20T13:00:00Z"), 409)
    assert [car["id"] for car in first.get(f"{API}/bookings/available-cars", query_string=window(
        "2035-01-20T12:30:00Z", "2035-01-20T13:00:00Z")).get_json()] == []
    assert second.delete(f"{API}/cars/1/maintenance-windows/1").status_code == 204
    assert book(first, 1, "2035-01-20T11:00:00Z", "2035-01-20T13:00:00Z").status_code == 201
    assert second.delete(f"{API}/bookings/1").status_code == 204
    open_window(first, 1, "2035-01-21T08:00:00Z", "2035-01-21T12:00:00Z")
    assert second.delete(f"{API}/cars/1").status_code == 204  # its window goes with it
    assert_problem(first.get(f"{API}/cars/1/maintenance-windows"), 404)
    assert table_rows(database)["maintenance_windows"] == []
    assert state(on_file(database).test_client()) == state(first) == state(second)


def test_threads_booking_and_opening_windows_on_one_car_through_two_apps_never_break_a_rule(database):
    apps = [on_file(database), on_file(database)]
    client = apps[0].test_client()
    set_turnaround(client, 30)
    make_car(client)
    base = datetime(2035, 3, 1, tzinfo=timezone.utc)

    def worker(i):
        rng = random.Random(i)
        made = 0
        for _ in range(40):
            start = base + timedelta(minutes=15 * rng.randrange(0, 4 * 48))
            end = start + timedelta(minutes=15 * rng.randrange(1, 12))
            target = apps[i % 2].test_client()
            response = open_window(target, 1, start.isoformat(), end.isoformat()) if i % 3 == 0 else \
                book(target, 1, start.isoformat(), end.isoformat(), customer_email=f"t{i}@example.com")
            assert response.status_code in (201, 409), response.get_json()
            made += response.status_code == 201
        return made

    made = run_at_once(8, worker)
    rows = table_rows(database)
    entries = sorted([(row[4], row[5]) for row in rows["bookings"]] + [(row[2], row[3]) for row in rows["maintenance_windows"]])
    assert len(entries) == sum(made) > 1
    gap = timedelta(minutes=30)
    spans = [(datetime.fromisoformat(s), datetime.fromisoformat(e)) for s, e in entries]
    assert all(later[0] >= earlier[1] + gap for earlier, later in zip(spans, spans[1:]))
    fresh = state(on_file(database).test_client())
    assert fresh == state(apps[0].test_client()) == state(apps[1].test_client())
    assert len(fresh["bookings"]) + len(fresh["windows"][1]) == len(entries)


def write_version_1_file(path):
    """A database file as the previous version of the service wrote it: schema 1, with its change log."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN")
        statement = ""
        for part in dealership.SCHEMA_STEPS[0].sql.split(";"):
            statement += part + ";"
            if sqlite3.complete_statement(statement):
                conn.execute(statement)
                statement = ""
        conn.execute(f"PRAGMA application_id = {dealership.APPLICATION_ID}")
        conn.execute("INSERT INTO dealers (name, location) VALUES ('Oscar Mobility Main', 'Munich, Germany')")
        conn.execute("INSERT INTO cars (brand, model, year, color, daily_price, vin, status, dealer_id) "
                     f"VALUES ('Toyota', 'Camry', 2023, 'Blue', 64.5, '{vin(1)}', 'available', 1)")
        for start, end in [("2035-01-20T09:00:00", "2035-01-22T10:00:00"), ("2035-02-01T09:00:00", "2035-02-01T10:00:00")]:
            conn.execute("INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
                         "VALUES (1, 'Ada', 'ada@example.com', ?, ?)", (f"{start}.000000+00:00", f"{end}.000000+00:00"))
        conn.execute("PRAGMA user_version = 1")
        conn.execute("COMMIT")


def test_a_file_of_schema_version_1_is_upgraded_and_keeps_every_booking(sqlite_file, caplog):
    write_version_1_file(sqlite_file)
    caplog.set_level("INFO", logger="dealership")
    client = on_file(sqlite_file).test_client()
    assert f"schema upgraded from version 1 to {dealership.SCHEMA_VERSION}" in caplog.text
    with closing(sqlite3.connect(sqlite_file)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (dealership.SCHEMA_VERSION,)
        # every change logged before the feed is in it, as its record stands
        assert conn.execute("SELECT kind, id, action FROM changes ORDER BY seq").fetchall()[-2:] == [
            ("booking", 1, "changed"), ("booking", 2, "changed")]
    bookings = client.get(f"{API}/bookings").get_json()
    assert [(b["id"], b["start_datetime"], b["total_price"]) for b in bookings] == [
        (1, "2035-01-20T09:00:00+00:00", 193.5), (2, "2035-02-01T09:00:00+00:00", 64.5)]
    assert client.get(f"{API}/dealers/1").get_json()["turnaround_minutes"] == 0
    # the new table and its change log work across apps
    other = on_file(sqlite_file).test_client()
    assert open_window(client, 1, "2035-01-25T08:00:00Z", "2035-01-25T12:00:00Z").status_code == 201
    assert_problem(book(other, 1, "2035-01-25T09:00:00Z", "2035-01-25T10:00:00Z"), 409)
    assert book(other, 1, "2035-01-26T09:00:00Z", "2035-01-26T10:00:00Z").get_json()["id"] == 3
    # and opening it again changes nothing
    assert state(on_file(sqlite_file).test_client()) == state(client)


# ---------------------------------------------------------------------------------------------
# Randomized: every answer against a brute-force oracle
# ---------------------------------------------------------------------------------------------


def test_random_bookings_match_a_brute_force_oracle(client):
    rng = random.Random(20261124)
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    car_ids = [make_car(client, vin=vin(n))["id"] for n in range(6)]
    oracle = {}  # booking id -> (car id, start, end)

    def moment(hour):
        return base + timedelta(hours=hour)

    def free(car_id, start, end):
        return all(not (c == car_id and s < end and start < e) for c, s, e in oracle.values())

    for step in range(400):
        if oracle and rng.random() < 0.3:
            booking_id = rng.choice(list(oracle))
            assert client.delete(f"{API}/bookings/{booking_id}").status_code == 204
            del oracle[booking_id]
        else:
            car_id = rng.choice(car_ids)
            start = moment(rng.randrange(0, 200))
            end = start + timedelta(hours=rng.randrange(1, 12))
            response = book(client, car_id, start.isoformat(), end.isoformat())
            if free(car_id, start, end):
                assert response.status_code == 201, (step, response.get_json())
                oracle[response.get_json()["id"]] = (car_id, start, end)
            else:
                assert response.status_code == 409, (step, response.get_json())
        start = moment(rng.randrange(0, 200))
        end = start + timedelta(hours=rng.randrange(1, 24))
        answer = client.get(f"{API}/bookings/available-cars",
                            query_string=window(start.isoformat(), end.isoformat())).get_json()
        assert [car["id"] for car in answer] == [c for c in car_ids if free(c, start, end)]
    listed = client.get(f"{API}/bookings").get_json()
    assert sorted(b["id"] for b in listed) == sorted(oracle)


# ---------------------------------------------------------------------------------------------
# One car's calendar
# ---------------------------------------------------------------------------------------------


def calendar(client, car_id, start, end):
    return client.get(f"{API}/cars/{car_id}/availability", query_string=window(start, end))


def test_calendar_lists_busy_bookings_unclipped_and_free_gaps_clipped(client):
    make_car(client)
    book(client, 1, "2035-01-01T08:00:00Z", "2035-01-01T10:00:00Z")  # 1: reaches into the window
    book(client, 1, "2035-01-01T14:00:00Z", "2035-01-01T15:00:00Z")  # 2
    book(client, 1, "2035-01-01T15:00:00Z", "2035-01-01T16:00:00Z")  # 3: back to back with 2
    book(client, 1, "2035-01-02T00:00:00Z", "2035-01-02T01:00:00Z")  # 4: starts at the window's end
    response = calendar(client, 1, "2035-01-01T09:00:00Z", "2035-01-02T00:00:00Z")
    assert response.status_code == 200
    assert response.get_json() == {
        "car_id": 1, "start_datetime": "2035-01-01T09:00:00+00:00", "end_datetime": "2035-01-02T00:00:00+00:00",
        "status": "available", "turnaround_minutes": 0, "available": False,
        "reason": "Car 1 is already booked from 2035-01-01T08:00:00+00:00 to 2035-01-01T10:00:00+00:00 by booking 1.",
        "busy": [
            {"booking_id": 1, "start_datetime": "2035-01-01T08:00:00+00:00", "end_datetime": "2035-01-01T10:00:00+00:00"},
            {"booking_id": 2, "start_datetime": "2035-01-01T14:00:00+00:00", "end_datetime": "2035-01-01T15:00:00+00:00"},
            {"booking_id": 3, "start_datetime": "2035-01-01T15:00:00+00:00", "end_datetime": "2035-01-01T16:00:00+00:00"},
        ],
        "maintenance": [],
        "free": [
            {"start_datetime": "2035-01-01T10:00:00+00:00", "end_datetime": "2035-01-01T14:00:00+00:00"},
            {"start_datetime": "2035-01-01T16:00:00+00:00", "end_datetime": "2035-01-02T00:00:00+00:00"},
        ],
        "held": [],
    }


def test_calendar_of_a_free_car_is_one_gap(client):
    make_car(client)
    body = calendar(client, 1, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z").get_json()
    assert body["available"] is True and body["reason"] is None and body["busy"] == []
    assert body["free"] == [{"start_datetime": "2035-01-01T00:00:00+00:00", "end_datetime": "2035-01-02T00:00:00+00:00"}]


def test_calendar_fully_booked_has_no_zero_length_gap(client):
    make_car(client)
    book(client, 1, "2035-01-01T00:00:00Z", "2035-01-01T12:00:00Z")
    book(client, 1, "2035-01-01T12:00:00Z", "2035-01-02T00:00:00Z")
    body = calendar(client, 1, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z").get_json()
    assert [b["booking_id"] for b in body["busy"]] == [1, 2]
    assert body["free"] == [] and body["available"] is False


def test_calendar_of_a_car_in_maintenance(client):
    make_car(client, status="maintenance")
    body = calendar(client, 1, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z").get_json()
    assert body["status"] == "maintenance"
    assert body["available"] is False and body["free"] == [] and body["busy"] == []


def test_calendar_errors(client):
    make_car(client)
    assert_problem(calendar(client, 9, "2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z"), 404)
    assert_problem(calendar(client, 1, "2035-01-02T00:00:00Z", "2035-01-01T00:00:00Z"), 422, "end_datetime")
    assert_problem(client.get(f"{API}/cars/1/availability"), 422, "start_datetime", "end_datetime")


# ---------------------------------------------------------------------------------------------
# Rescheduling and editing
# ---------------------------------------------------------------------------------------------


def patch_booking(client, booking_id, **changes):
    return client.patch(f"{API}/bookings/{booking_id}", json=changes)


def test_reschedule_into_its_own_time(client):
    make_car(client)
    book(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")
    response = patch_booking(client, 1, start_datetime="2035-01-15T11:00:00Z", end_datetime="2035-01-15T14:00:00Z")
    assert response.status_code == 200
    assert response.get_json() == {**booking_body(1, "2035-01-15T11:00:00+00:00", "2035-01-15T14:00:00+00:00"), "id": 1,
                                   "total_price": 100.0, "currency": "EUR"}
    # the old slot is free again, the new one is taken
    assert book(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T11:00:00Z").status_code == 201
    assert_problem(book(client, 1, "2035-01-15T13:00:00Z", "2035-01-15T15:00:00Z"), 409)


def test_extend_a_booking(client):
    make_car(client)
    book(client, 1)
    assert patch_booking(client, 1, end_datetime="2035-01-16T12:00:00Z").get_json()["end_datetime"] == \
        "2035-01-16T12:00:00+00:00"


def test_move_a_booking_to_another_car(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    book(client, 1)
    assert patch_booking(client, 1, car_id=2).get_json()["car_id"] == 2
    assert client.delete(f"{API}/cars/1").status_code == 204
    assert_problem(client.delete(f"{API}/cars/2"), 409)


def test_edit_customer_only(client):
    make_car(client)
    book(client, 1)
    body = patch_booking(client, 1, customer_name=" Grace ", customer_email="grace@example.com").get_json()
    assert (body["customer_name"], body["customer_email"]) == ("Grace", "grace@example.com")
    assert body["start_datetime"] == "2035-01-15T10:00:00+00:00"


@pytest.mark.parametrize("changes, status", [
    ({"start_datetime": "2035-01-15T13:00:00Z"}, 422),  # after its stored end
    ({"end_datetime": "2035-01-15T10:00:00Z"}, 422),  # zero length with its stored start
    ({"customer_email": "nope"}, 422),
    ({"id": 5}, 422),
    ({"car_id": 9}, 404),
    ({"car_id": 2}, 409),  # the other car is busy then
    ({"car_id": 3}, 409),  # in maintenance
    ({"end_datetime": "2035-01-16T11:00:00Z"}, 409),  # runs into booking 2
])
def test_rejected_change_leaves_the_booking_as_it_was(client, changes, status):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    make_car(client, vin=vin(3), status="maintenance")
    before = book(client, 1).get_json()
    book(client, 1, "2035-01-16T10:00:00Z", "2035-01-16T12:00:00Z")
    book(client, 2)
    assert_problem(patch_booking(client, 1, **changes), status)
    assert client.get(f"{API}/bookings/1").get_json() == before
    assert [b["id"] for b in client.get(f"{API}/bookings?car_id=1").get_json()] == [1, 2]


def test_conflict_on_change_names_the_other_booking(client):
    make_car(client)
    book(client, 1)
    book(client, 1, "2035-01-16T10:00:00Z", "2035-01-16T12:00:00Z")
    body = assert_problem(patch_booking(client, 1, end_datetime="2035-01-16T11:00:00Z"), 409)
    assert "booking 2" in body["detail"]


def test_change_unknown_booking_is_404(client):
    assert_problem(patch_booking(client, 4, customer_name="X"), 404)


def test_patch_car_is_a_partial_update(client):
    make_car(client)
    response = client.patch(f"{API}/cars/1", json={"daily_price": 80})
    assert response.status_code == 200 and response.get_json()["daily_price"] == 80
    assert_problem(client.patch(f"{API}/cars/1", json={"year": 3000}), 422, "year")
    assert client.get(f"{API}/cars/1").get_json()["daily_price"] == 80


# ---------------------------------------------------------------------------------------------
# Dealers
# ---------------------------------------------------------------------------------------------


def test_create_and_delete_dealer(client):
    response = client.post(f"{API}/dealers", json={"name": " Oscar Mobility North ", "location": "Hamburg"})
    assert response.status_code == 201
    assert response.headers["Location"] == f"{API}/dealers/2"
    assert response.get_json() == {"id": 2, "name": "Oscar Mobility North", "location": "Hamburg",
                                   "turnaround_minutes": 0}
    assert client.post(f"{API}/dealers", json={"name": "No Location"}).get_json()["location"] == ""
    assert client.delete(f"{API}/dealers/2").status_code == 204
    assert_problem(client.get(f"{API}/dealers/2"), 404)


@pytest.mark.parametrize("body, name", [({}, "name"), ({"name": "  "}, "name"), ({"name": "x" * 201}, "name"),
                                        ({"name": "A", "location": 3}, "location"), ({"name": "A", "id": 2}, "id")])
def test_create_dealer_rejects_bad_fields(client, body, name):
    assert_problem(client.post(f"{API}/dealers", json=body), 422, name)
    assert len(client.get(f"{API}/dealers").get_json()) == 1


def test_dealer_with_cars_cannot_be_deleted(client):
    make_car(client)
    body = assert_problem(client.delete(f"{API}/dealers/1"), 409)
    assert "1 car" in body["detail"]
    assert client.get(f"{API}/dealers/1").status_code == 200
    assert_problem(client.delete(f"{API}/dealers/7"), 404)


def test_cars_and_available_cars_filter_by_dealer(client):
    client.post(f"{API}/dealers", json={"name": "North"})
    make_car(client, vin=vin(1), dealer_id=1)
    make_car(client, vin=vin(2), dealer_id=2)
    assert [c["id"] for c in client.get(f"{API}/cars?dealer_id=2").get_json()] == [2]
    params = window("2035-01-01T00:00:00Z", "2035-01-02T00:00:00Z")
    url = f"{API}/bookings/available-cars"
    assert [c["id"] for c in client.get(url, query_string=params | {"dealer_id": 1}).get_json()] == [1]
    assert_problem(client.get(url, query_string=params | {"dealer_id": "x"}), 422, "dealer_id")


# ---------------------------------------------------------------------------------------------
# Paging and filters
# ---------------------------------------------------------------------------------------------


def test_cars_paging_and_total_count(client):
    for n in range(5):
        make_car(client, vin=vin(n))
    response = client.get(f"{API}/cars?limit=2&offset=1")
    assert [c["id"] for c in response.get_json()] == [2, 3]
    assert response.headers["X-Total-Count"] == "5"
    assert [c["id"] for c in client.get(f"{API}/cars?offset=4").get_json()] == [5]
    assert client.get(f"{API}/cars?offset=9").get_json() == []
    assert client.get(f"{API}/cars").headers["X-Total-Count"] == "5"


def test_bookings_paging_and_email_filter(client):
    make_car(client)
    for day, email in enumerate(["a@example.com", "B@Example.com", "b@example.com"], start=10):
        book(client, 1, f"2035-01-{day}T00:00:00Z", f"2035-01-{day}T01:00:00Z", customer_email=email)
    response = client.get(f"{API}/bookings?customer_email=b@EXAMPLE.com")
    assert [b["id"] for b in response.get_json()] == [2, 3]
    assert response.headers["X-Total-Count"] == "2"
    response = client.get(f"{API}/bookings?limit=1&offset=1")
    assert [b["id"] for b in response.get_json()] == [2] and response.headers["X-Total-Count"] == "3"


@pytest.mark.parametrize("path", ["/cars", "/bookings"])
@pytest.mark.parametrize("query_string, name", [("limit=0", "limit"), ("limit=1001", "limit"), ("limit=x", "limit"),
                                                ("offset=-1", "offset"), ("offset=1.5", "offset")])
def test_bad_paging_is_422(client, path, query_string, name):
    assert_problem(client.get(f"{API}{path}?{query_string}"), 422, name)


def test_bookings_come_a_page_at_a_time_with_links_that_keep_the_filters(client):
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    for n in range(130):
        book(client, 1 + n % 2, (base + timedelta(hours=n)).isoformat(), (base + timedelta(hours=n, minutes=30)).isoformat())
    first = client.get(f"{API}/bookings")
    assert [b["id"] for b in first.get_json()] == list(range(1, 101))  # the default page
    assert first.headers["X-Total-Count"] == "130"
    assert first.headers["Link"] == f'<{API}/bookings?offset=100&limit=100>; rel="next"'
    last = client.get(first.headers["Link"].split(">")[0][1:])
    assert [b["id"] for b in last.get_json()] == list(range(101, 131))
    assert last.headers["Link"] == f'<{API}/bookings?offset=0&limit=100>; rel="prev"'
    middle = client.get(f"{API}/bookings?car_id=2&start_datetime=2035-01-01T10:00:00Z&limit=5&offset=5")
    assert [b["id"] for b in middle.get_json()] == [22, 24, 26, 28, 30]
    assert middle.headers["X-Total-Count"] == "60"
    assert middle.headers["Link"] == (
        f'<{API}/bookings?car_id=2&start_datetime=2035-01-01T10%3A00%3A00Z&limit=5&offset=10>; rel="next", '
        f'<{API}/bookings?car_id=2&start_datetime=2035-01-01T10%3A00%3A00Z&limit=5&offset=0>; rel="prev"')
    assert_problem(client.get(f"{API}/bookings?limit=1001"), 422, "limit")
    cars = client.get(f"{API}/cars")
    assert len(cars.get_json()) == 2 and "Link" not in cars.headers  # a fleet comes whole unless paged
    assert client.get(f"{API}/cars?limit=1").headers["Link"] == f'<{API}/cars?limit=1&offset=1>; rel="next"'


def test_every_way_to_list_bookings_matches_a_brute_force_oracle(client):
    rng = random.Random(99)
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    for n in range(3):
        make_car(client, vin=vin(n))
    booked = []
    for _ in range(120):
        start = base + timedelta(hours=rng.randrange(0, 300))
        end = start + timedelta(hours=rng.randrange(1, 30))
        email = rng.choice(["ada@example.com", "Grace@Example.com", "alan@example.org"])
        response = book(client, rng.randrange(1, 4), start.isoformat(), end.isoformat(), customer_email=email)
        if response.status_code == 201:
            booked.append(response.get_json() | {"start": start, "end": end})
    for booking in rng.sample(booked, 20):
        assert client.delete(f"{API}/bookings/{booking['id']}").status_code == 204
        booked.remove(booking)
    for _ in range(200):
        query, keep = {}, lambda b: True
        if rng.random() < 0.3:
            car_id = rng.randrange(1, 4)
            query["car_id"], keep = car_id, lambda b, k=keep, c=car_id: k(b) and b["car_id"] == c
        if rng.random() < 0.3:
            email = rng.choice(["ADA@example.com", "grace@example.com", "nobody@example.com"])
            query["customer_email"] = email
            keep = lambda b, k=keep, e=email: k(b) and b["customer_email"].casefold() == e.casefold()
        start, end = base + timedelta(hours=rng.randrange(-10, 320)), None
        roll = rng.random()
        if roll < 0.3:
            query["start_datetime"], keep = start.isoformat(), lambda b, k=keep, s=start: k(b) and b["start"] >= s
        elif roll < 0.6:
            query["end_datetime"], keep = start.isoformat(), lambda b, k=keep, e=start: k(b) and b["end"] <= e
        elif roll < 0.8:
            end = start + timedelta(hours=rng.randrange(1, 50))
            query |= {"start_datetime": start.isoformat(), "end_datetime": end.isoformat()}
            keep = lambda b, k=keep, s=start, e=end: k(b) and b["start"] < e and s < b["end"]
        query |= {"limit": rng.choice([1, 7, 100]), "offset": rng.choice([0, 3, 50])}
        expected = sorted((b for b in booked if keep(b)), key=lambda b: (b["start"], b["id"]))
        response = client.get(f"{API}/bookings", query_string=query)
        assert response.headers["X-Total-Count"] == str(len(expected)), query
        page = expected[query["offset"]:query["offset"] + query["limit"]]
        assert [b["id"] for b in response.get_json()] == [b["id"] for b in page], query


def test_bad_email_filter_is_422(client):
    assert_problem(client.get(f"{API}/bookings?customer_email=not-mail"), 422, "customer_email")


# ---------------------------------------------------------------------------------------------
# Local time: DEALERSHIP_TIMEZONE
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def berlin():
    return new_app({"DEALERSHIP_TIMEZONE": "Europe/Berlin"}).test_client()


def test_naive_input_is_local_time_and_output_carries_the_zone(berlin):
    make_car(berlin)
    body = book(berlin, 1, "2035-07-01T10:00:00", "2035-07-01T12:00:00").get_json()
    assert body["start_datetime"] == "2035-07-01T10:00:00+02:00"  # summer time
    # with an offset the value is that instant, and it is shown in Berlin time
    body = book(berlin, 1, "2035-01-15T10:00:00Z", "2035-01-15T11:00:00Z").get_json()
    assert body["start_datetime"] == "2035-01-15T11:00:00+01:00"
    assert_problem(book(berlin, 1, "2035-07-01T08:30:00Z", "2035-07-01T09:00:00Z"), 409)  # 10:30 local


def test_spring_forward_gap_is_422(berlin):
    make_car(berlin)
    body = assert_problem(book(berlin, 1, "2035-03-25T02:30:00", "2035-03-25T04:00:00"), 422, "start_datetime")
    assert "Europe/Berlin" in body["errors"]["start_datetime"][0]
    # the hour around the gap is fine: 01:59 is +01:00, 03:00 is +02:00, one minute apart
    body = book(berlin, 1, "2035-03-25T01:59:00", "2035-03-25T03:00:00").get_json()
    assert (body["start_datetime"], body["end_datetime"]) == ("2035-03-25T01:59:00+01:00", "2035-03-25T03:00:00+02:00")


def test_fall_back_hour_takes_the_first_occurrence(berlin):
    make_car(berlin)
    body = book(berlin, 1, "2035-10-28T02:30:00", "2035-10-28T03:30:00").get_json()
    # 02:30 happens twice; the first (summer time) is meant. 03:30 is winter time: two hours later.
    assert (body["start_datetime"], body["end_datetime"]) == ("2035-10-28T02:30:00+02:00", "2035-10-28T03:30:00+01:00")
    assert_problem(book(berlin, 1, "2035-10-28T01:00:00Z", "2035-10-28T01:30:00Z"), 409)  # 02:00-02:30 +01:00
    assert book(berlin, 1, "2035-10-28T02:30:00+01:00", "2035-10-28T03:00:00+01:00").status_code == 409


def test_local_time_applies_to_queries(berlin):
    make_car(berlin)
    book(berlin, 1, "2035-07-01T10:00:00", "2035-07-01T12:00:00")
    url = f"{API}/bookings/available-cars"
    assert berlin.get(url, query_string=window("2035-07-01T11:00:00", "2035-07-01T11:30:00")).get_json() == []
    assert len(berlin.get(url, query_string=window("2035-07-01T09:00:00Z", "2035-07-01T10:00:00Z")).get_json()) == 0
    assert len(berlin.get(url, query_string=window("2035-07-01T10:00:00Z", "2035-07-01T11:00:00Z")).get_json()) == 1


def test_output_that_overflows_in_the_zone_is_422(berlin):
    make_car(berlin)
    assert_problem(book(berlin, 1, "9999-12-31T22:00:00Z", "9999-12-31T23:30:00Z"), 422, "end_datetime")


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe", "", "../etc/passwd"])
def test_unknown_zone_refuses_to_start(zone):
    with pytest.raises(dealership.ConfigError, match=f"DEALERSHIP_TIMEZONE={zone!r} is not a known time zone"):
        new_app({"DEALERSHIP_TIMEZONE": zone})


# ---------------------------------------------------------------------------------------------
# Settings from the environment, the API key, demo data, logs
# ---------------------------------------------------------------------------------------------


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEALERSHIP_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("DEALERSHIP_MAX_CONTENT_LENGTH", "300")
    monkeypatch.setenv("DEALERSHIP_API_KEY", "1234567890123456")  # digits: still text, never a number
    app = new_app()
    assert app.config["DEALERSHIP_TIMEZONE"] == "Europe/Berlin"
    client = app.test_client()
    auth = {"Authorization": "Bearer 1234567890123456"}
    assert client.post(f"{API}/cars", json=car_body(), headers=auth).status_code == 201
    assert_problem(client.post(f"{API}/cars", json=car_body(brand="x" * 300), headers=auth), 413)


@pytest.mark.parametrize("value", ["0", "false", "null", "[]", "{}", "1.10", "1e3", "true", " padded-key-of-many-chars",
                                   "key-of-many-chars ", "key-of-many-chärs", "key-of-many\tchars", "short-key"])
def test_an_api_key_no_client_could_send_refuses_to_start(monkeypatch, value):
    monkeypatch.setenv("DEALERSHIP_API_KEY", value)
    with pytest.raises(dealership.ConfigError, match="DEALERSHIP_API_KEY must be at least 16 printable ASCII"):
        new_app()


def test_an_api_key_is_taken_as_written(monkeypatch, caplog):
    monkeypatch.setenv("DEALERSHIP_API_KEY", "[1, 2, 3, 4, 5, 6]")  # JSON to some, text here
    client = new_app().test_client()
    assert client.post(f"{API}/cars", json=car_body(), headers={"Authorization": "Bearer [1, 2, 3, 4, 5, 6]"}).status_code == 201
    monkeypatch.setenv("DEALERSHIP_API_KEY", "")  # empty: not set
    with caplog.at_level("WARNING", logger="dealership"):
        assert new_app().test_client().post(f"{API}/cars", json=car_body(vin=vin(2))).status_code == 201
    assert "DEALERSHIP_API_KEY is not set" in caplog.text


@pytest.mark.parametrize("value, loaded", [("1", True), ("true", True), ("YES", True), ("On", True),
                                           ("0", False), ("false", False), ("no", False), ("OFF", False)])
def test_booleans_read_as_words(monkeypatch, value, loaded):
    monkeypatch.setenv("DEALERSHIP_DEMO_DATA", value)
    assert bool(new_app().test_client().get(f"{API}/cars").get_json()) is loaded


@pytest.mark.parametrize("name, value", [
    ("DEALERSHIP_DEMO_DATA", "maybe"), ("DEALERSHIP_DEMO_DATA", "2"), ("DEALERSHIP_MAX_CONTENT_LENGTH", "1e3"),
    ("DEALERSHIP_MAX_CONTENT_LENGTH", "-5"), ("DEALERSHIP_MAX_CONTENT_LENGTH", "1_000"), ("DEALERSHIP_MAX_CONTENT_LENGTH", "0"),
    ("DEALERSHIP_BUSY_TIMEOUT", "soon"), ("DEALERSHIP_BUSY_TIMEOUT", "-1"), ("DEALERSHIP_SYNCHRONOUS", "off"),
    ("DEALERSHIP_TIMEZONE", "Mars/Olympus")])
def test_a_setting_that_is_not_what_it_should_be_refuses_to_start_naming_it(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(dealership.ConfigError, match=name):
        new_app()


def test_config_mapping_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("DEALERSHIP_API_KEY", "from-the-environment")
    client = new_app({"DEALERSHIP_API_KEY": None}).test_client()
    assert client.post(f"{API}/cars", json=car_body()).status_code == 201


def test_bad_body_limit_refuses_to_start():
    with pytest.raises(ValueError, match="DEALERSHIP_MAX_CONTENT_LENGTH"):
        new_app({"DEALERSHIP_MAX_CONTENT_LENGTH": "lots"})


@pytest.fixture
def locked():
    return new_app({"DEALERSHIP_API_KEY": "s3cret-key-for-tests"}).test_client()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic czNjcmV0"},
                                     {"Authorization": "s3cret-key-for-tests"}, {"Authorization": "Bearer s3cret-key-for-tests2"},
                                     {"Authorization": "Bearer"}])
def test_writes_without_the_key_are_401_and_change_nothing(locked, headers):
    for method, path, body in [("post", "/cars", car_body()), ("put", "/cars/1", {"color": "Red"}),
                               ("patch", "/bookings/1", {"customer_name": "X"}), ("delete", "/dealers/1", None),
                               ("post", "/dealers", {"name": "X"})]:
        response = getattr(locked, method)(API + path, json=body, headers=headers)
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].lower().startswith("bearer")
    assert locked.get(f"{API}/cars").get_json() == []
    assert len(locked.get(f"{API}/dealers").get_json()) == 1


def test_writes_with_the_key_work_and_reads_other_than_bookings_stay_open(locked):
    auth = {"Authorization": "Bearer s3cret-key-for-tests"}
    assert locked.post(f"{API}/cars", json=car_body(), headers=auth).status_code == 201
    assert locked.post(f"{API}/bookings", json=booking_body(1), headers=auth).status_code == 201
    for path in ("/cars", "/cars/1", "/dealers", "/dealers/1", "/cars/1/availability?" + WINDOW, "",
                 "/bookings/available-cars?" + WINDOW):
        assert locked.get(API + path).status_code == 200, path
    calendar = locked.get(f"{API}/cars/1/availability?" + WINDOW).get_json()
    assert calendar["busy"] == [{"booking_id": 1, "start_datetime": "2035-01-15T10:00:00+00:00",
                                 "end_datetime": "2035-01-15T12:00:00+00:00"}]  # ids and times only
    assert locked.get(f"{API}/bookings", headers=auth).status_code == 200
    assert locked.get(f"{API}/bookings/1", headers=auth).get_json()["customer_name"] == "Ada Lovelace"
    assert locked.delete(f"{API}/bookings/1", headers=auth).status_code == 204


WINDOW = "start_datetime=2035-01-15T00:00:00Z&end_datetime=2035-01-16T00:00:00Z"


@pytest.mark.parametrize("path", ["/bookings", "/bookings/1", "/bookings?customer_email=ada@example.com"])
def test_reading_bookings_needs_the_key_when_one_is_set(locked, path, caplog):
    auth = {"Authorization": "Bearer s3cret-key-for-tests"}
    locked.post(f"{API}/cars", json=car_body(), headers=auth)
    locked.post(f"{API}/bookings", json=booking_body(1), headers=auth)
    missing = assert_problem(locked.get(API + path), 401)
    assert missing["detail"].startswith("No API key was sent: this request reads customers' names")
    wrong = assert_problem(locked.get(API + path, headers={"Authorization": "Bearer guess-guess-guess"}), 401)
    assert wrong["detail"].startswith("The API key does not match")
    assert "Ada" not in str(missing) + str(wrong)
    assert locked.get(API + path, headers=auth).status_code == 200


def test_ten_refused_keys_a_minute_then_429_for_that_address_only(locked):
    wrong, right = {"Authorization": "Bearer guess-guess-guess"}, {"Authorization": "Bearer s3cret-key-for-tests"}
    for _ in range(10):
        assert_problem(locked.post(f"{API}/dealers", json={"name": "X"}, headers=wrong), 401)
    throttled = locked.post(f"{API}/dealers", json={"name": "X"}, headers=wrong)
    assert "refused API keys" in assert_problem(throttled, 429)["detail"]
    assert int(throttled.headers["Retry-After"]) > 0
    assert locked.get(f"{API}/cars").status_code == 200  # what needs no key is not held up
    elsewhere = locked.post(f"{API}/dealers", json={"name": "X"}, headers=right, environ_base={"REMOTE_ADDR": "192.0.2.9"})
    assert elsewhere.status_code == 201
    assert len(locked.get(f"{API}/dealers").get_json()) == 2  # the throttled request changed nothing
    fresh = new_app({"DEALERSHIP_API_KEY": "s3cret-key-for-tests"}).test_client()  # another app counts apart
    assert_problem(fresh.post(f"{API}/dealers", json={"name": "X"}, headers=wrong), 401)


def test_a_general_rate_limit_per_address_and_addresses_through_trusted_proxies_only():
    limited = new_app({"DEALERSHIP_RATE_LIMIT": "3/minute"}).test_client()
    assert [limited.get(f"{API}/cars").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert limited.get("/health").status_code == 200  # outside the API
    # without DEALERSHIP_PROXIES a client cannot pose as another address
    spoofing = [limited.get(f"{API}/cars", headers={"X-Forwarded-For": f"192.0.2.{n}"}).status_code for n in range(2)]
    assert spoofing == [429, 429]
    behind = new_app({"DEALERSHIP_RATE_LIMIT": "1/minute", "DEALERSHIP_PROXIES": 1}).test_client()
    assert [behind.get(f"{API}/cars", headers={"X-Forwarded-For": f"192.0.2.{n % 2}"}).status_code
            for n in range(4)] == [200, 200, 429, 429]


@pytest.mark.parametrize("value", ["lots", "300/fortnight", "-1/minute"])
def test_a_bad_rate_limit_refuses_to_start(value):
    with pytest.raises(dealership.ConfigError, match="DEALERSHIP_RATE_LIMIT"):
        new_app({"DEALERSHIP_RATE_LIMIT": value})


def test_refused_keys_are_logged_once_a_minute_per_client_never_the_key(locked, caplog):
    with caplog.at_level("WARNING", logger="dealership"):
        for _ in range(5):
            locked.post(f"{API}/cars", json=car_body(), headers={"Authorization": "Bearer guess-guess-guess"})
        locked.get(f"{API}/bookings", environ_base={"REMOTE_ADDR": "192.0.2.7"})
    lines = [r.getMessage() for r in caplog.records if r.name == "dealership" and "refused" in r.getMessage()]
    assert lines == ["refused API key from 127.0.0.1: POST /api/v1/cars",
                     "refused API key from 192.0.2.7: GET /api/v1/bookings"]
    assert "guess" not in caplog.text


def test_open_service_warns_once_at_start(caplog):
    with caplog.at_level("WARNING", logger="dealership"):
        new_app()
    assert [r.getMessage() for r in caplog.records if "DEALERSHIP_API_KEY" in r.getMessage()] == [
        "DEALERSHIP_API_KEY is not set: anyone who can reach the service can change its data."]
    caplog.clear()
    with caplog.at_level("WARNING", logger="dealership"):
        new_app({"DEALERSHIP_API_KEY": "a-key-of-16-chars"})
    assert caplog.records == []


def test_demo_data():
    client = new_app({"DEALERSHIP_DEMO_DATA": True}).test_client()
    cars = client.get(f"{API}/cars").get_json()
    assert len(cars) >= 5
    assert {car["status"] for car in cars} == {"available", "maintenance"}
    assert {car["dealer_id"] for car in cars} == {1, 2}
    assert len({car["vin"][-6:] for car in cars}) == len(cars)  # the part of a VIN the board shows
    assert len(client.get(f"{API}/dealers").get_json()) == 2
    assert len(client.get(f"{API}/bookings").get_json()) >= 2
    assert new_app().test_client().get(f"{API}/cars").get_json() == []  # off by default


def test_demo_data_on_a_store_with_cars_loads_nothing_and_says_why(tmp_path, caplog):
    path = str(tmp_path / "own.sqlite3")
    make_car(create_app({"TESTING": True, "DEALERSHIP_DATABASE": path}).test_client())
    with caplog.at_level("INFO", logger="dealership"):
        client = create_app({"TESTING": True, "DEALERSHIP_DATABASE": path, "DEALERSHIP_DEMO_DATA": True}).test_client()
    assert [car["id"] for car in client.get(f"{API}/cars").get_json()] == [1]
    assert len(client.get(f"{API}/dealers").get_json()) == 1
    assert "demo data skipped: the database has cars already" in caplog.text


def test_under_waitress_each_event_is_logged_once(tmp_path):
    """waitress sets up the root logger after the app is made; the service's line must not come twice."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {
        "DEALERSHIP_DATABASE": str(tmp_path / "d.sqlite3")}
    root = os.path.dirname(os.path.abspath(dealership.__file__))
    server = subprocess.Popen([sys.executable, "-m", "waitress", f"--listen=127.0.0.1:{port}", "--call",
                               "dealership:create_app"], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.2)
        request = urllib.request.Request(f"http://127.0.0.1:{port}{API}/cars", json.dumps(car_body()).encode(),
                                         {"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=10).close()
    finally:
        server.terminate()
        output = server.communicate(timeout=10)[0]
    assert output.count("car 1 created: dealer 1, status available") == 1, output
    assert all(LOG_LINE.match(line) for line in output.splitlines()), output


def test_logs_name_ids_and_times_never_the_customer(client, caplog):
    with caplog.at_level("INFO", logger="dealership"):
        make_car(client)
        book(client, 1, customer_name="Secret Name", customer_email="secret@example.com")
        patch_booking(client, 1, end_datetime="2035-01-15T13:00:00Z")
        client.delete(f"{API}/bookings/1")
        client.delete(f"{API}/cars/1")
    lines = [r.getMessage() for r in caplog.records if r.name == "dealership"]
    assert lines == [
        "car 1 created: dealer 1, status available",
        "booking 1 created: car 1, 2035-01-15T10:00:00+00:00 to 2035-01-15T12:00:00+00:00",
        "booking 1 changed: car 1, 2035-01-15T10:00:00+00:00 to 2035-01-15T13:00:00+00:00",
        "booking 1 cancelled: car 1, 2035-01-15T10:00:00+00:00 to 2035-01-15T13:00:00+00:00",
        "car 1 deleted",
    ]
    assert "Secret" not in caplog.text and "secret@" not in caplog.text


# Every line: an ISO 8601 time with offset, level, process id, logger, message.
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                      r"(\d+) [\w.]+( \[[ -~]{1,200}\])?: \S")


def test_the_log_line_starts_with_its_time_level_process_and_logger():
    import logging

    record = logging.LogRecord("dealership", logging.INFO, __file__, 1, "booking %d created", (7,), None)
    line = dealership.LogFormatter().format(record)
    assert LOG_LINE.match(line) and line.endswith(f" INFO {os.getpid()} dealership: booking 7 created"), line
    written = datetime.fromisoformat(line.split(" ")[0])
    assert written.utcoffset() is not None and abs(written.timestamp() - record.created) < 0.001


def test_a_standalone_app_writes_the_service_line_and_a_host_keeps_its_own(tmp_path):
    """create_app sets up the line when nothing else has; a host that set up logging keeps its format."""
    code = ("import logging, sys\n"
            "if sys.argv[1] == 'host': logging.basicConfig(format='HOST %(message)s', level=logging.INFO)\n"
            "import dealership\n"
            "client = dealership.create_app().test_client()\n"
            f"client.post('/api/v1/cars', json={car_body()!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {
        "DEALERSHIP_DATABASE": str(tmp_path / "d.sqlite3")}
    root = os.path.dirname(os.path.abspath(dealership.__file__))
    for who in ("standalone", "host"):
        result = subprocess.run([sys.executable, "-c", code, who], cwd=root, env=env, capture_output=True, text=True,
                                timeout=60)
        lines = result.stderr.splitlines()
        assert result.returncode == 0 and any("car 1 created" in line for line in lines), result.stderr
        if who == "standalone":
            assert all(LOG_LINE.match(line) for line in lines), result.stderr
        else:
            assert all(line.startswith("HOST ") for line in lines), result.stderr
        (tmp_path / "d.sqlite3").unlink()


# ---------------------------------------------------------------------------------------------
# Storage: a SQLite file under the dicts, shared by processes (here: by apps) on one machine
# ---------------------------------------------------------------------------------------------


@pytest.fixture(params=ENGINES)
def database(request, tmp_path):
    """A database that two apps share as two processes (or machines) would: a SQLite file, and a
    PostgreSQL database when DEALERSHIP_TEST_DATABASE_URL is set."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres_database")
    return str(tmp_path / "dealership.sqlite3")


@pytest.fixture
def sqlite_file(tmp_path):
    """A SQLite file, for what only that engine has: WAL, file permissions, a file moved or replaced."""
    return str(tmp_path / "dealership.sqlite3")


def sql(database, statement, params=()):
    """Run one statement on the database straight, as another program would (`?` for parameters);
    its rows, if it returns any."""
    if database.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(database, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []
    with closing(sqlite3.connect(database)) as conn, conn:
        conn.execute("PRAGMA foreign_keys = ON")
        return conn.execute(statement, [dealership.to_column(value) for value in params]).fetchall()


def insert_booking(database, car_id, start, end):
    """A booking written straight into the database, past the service's checks (one in the past, say)."""
    sql(database, "INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
                  "VALUES (?, 'Ada Lovelace', 'ada@example.com', ?, ?)", (car_id, start, end))


def on_file(path, **settings):
    """An app on the database file `path`: two of them behave exactly like two processes."""
    return create_app({"TESTING": True, "DEALERSHIP_DATABASE": path} | settings)


def state(client):
    """Everything a client can read, to compare before and after (every page of the bookings)."""
    found = {name: client.get(f"{API}/{name}").get_json() for name in ("dealers", "cars")}
    found["bookings"] = []
    while page := client.get(f"{API}/bookings?limit=1000&offset={len(found['bookings'])}").get_json():
        found["bookings"] += page
    found["windows"] = {car["id"]: client.get(f"{API}/cars/{car['id']}/maintenance-windows").get_json()
                        for car in found["cars"]}
    return found


def table_rows(database):
    """Every row of the service's tables, read with a connection of its own (instants as SQLite keeps them)."""
    return {table: [tuple(map(dealership.to_column, row)) for row in sql(database, f"SELECT * FROM {table} ORDER BY id")]
            for table in ("dealers", "cars", "bookings", "maintenance_windows")}


def test_data_survives_a_new_app_on_the_same_file(database):
    client = on_file(database).test_client()
    client.post(f"{API}/dealers", json={"name": "North", "location": "Hamburg"})
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2), dealer_id=2, daily_price=49.95)
    book(client, 1)
    book(client, 2, "2035-01-16T10:00:00+02:00", "2035-01-17T10:00:00+02:00")
    patch_booking(client, 1, end_datetime="2035-01-15T18:00:00Z")
    book(client, 1, "2035-02-01T10:00:00Z", "2035-02-01T12:00:00Z")
    assert client.delete(f"{API}/bookings/3").status_code == 204
    make_car(client, vin=vin(3))
    assert client.delete(f"{API}/cars/3").status_code == 204
    before = state(client)

    again = on_file(database).test_client()
    assert state(again) == before
    assert again.get(f"{API}/bookings/1").get_json()["end_datetime"] == "2035-01-15T18:00:00+00:00"
    assert_problem(again.get(f"{API}/bookings/3"), 404)
    # ids continue where they were and are never reused, even those of deleted records
    assert make_car(again, vin=vin(3))["id"] == 4
    assert book(again, 1, "2035-03-01T10:00:00Z", "2035-03-01T11:00:00Z").get_json()["id"] == 4


def test_times_are_stored_in_utc_and_the_database_guards_itself(sqlite_file):
    client = on_file(sqlite_file).test_client()
    make_car(client, vin=vin(1))
    book(client, 1, "2035-01-15T10:00:00+02:00", "2035-01-15T12:00:00+02:00")
    rows = table_rows(sqlite_file)
    assert rows["bookings"][0][4:] == ("2035-01-15T08:00:00.000000+00:00", "2035-01-15T10:00:00.000000+00:00", 10000, 1, "open")
    with closing(sqlite3.connect(sqlite_file)) as conn:
        conn.execute("PRAGMA foreign_keys = ON")
        for statement in [
            "INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
            "VALUES (1, 'x', 'x@example.com', '2035-01-02T00:00:00.000000+00:00', '2035-01-01T00:00:00.000000+00:00')",
            "INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
            "VALUES (99, 'x', 'x@example.com', '2035-01-01T00:00:00.000000+00:00', '2035-01-02T00:00:00.000000+00:00')",
            f"INSERT INTO cars (brand, model, year, color, daily_price, vin, status, dealer_id) "
            f"VALUES ('a', 'b', 2020, 'c', 1.0, '{vin(1)}', 'available', 1)",
        ]:
            with pytest.raises(sqlite3.IntegrityError):
                conn.execute(statement)


def test_the_file_is_in_wal_mode_with_the_durability_asked_for(sqlite_file, tmp_path):
    with closing(sqlite3.connect(on_file(sqlite_file).extensions["dealership"].engine.name)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    for setting, level in [("full", 2), ("normal", 1), ("NORMAL", 1)]:
        app = on_file(str(tmp_path / f"{setting}.sqlite3"), DEALERSHIP_SYNCHRONOUS=setting)
        assert app.extensions["dealership"].engine._writer.conn.execute("PRAGMA synchronous").fetchone() == (level,)


def test_default_database_is_in_the_instance_folder(tmp_path):
    from flask import Flask

    host = Flask("host", instance_path=str(tmp_path / "instance"))
    dealership.init_app(host)
    make_car(host.test_client())
    assert table_rows(str(tmp_path / "instance" / "dealership.sqlite3"))["cars"][0][0] == 1
    relative = Flask("relative", instance_path=str(tmp_path / "other"))
    relative.config["DEALERSHIP_DATABASE"] = "data/cars.sqlite3"
    dealership.init_app(relative)
    assert (tmp_path / "other" / "data" / "cars.sqlite3").exists()


@pytest.mark.parametrize("setting, value", [
    ("DEALERSHIP_SYNCHRONOUS", "off"), ("DEALERSHIP_SYNCHRONOUS", 2), ("DEALERSHIP_BUSY_TIMEOUT", "soon"),
    ("DEALERSHIP_BUSY_TIMEOUT", -1), ("DEALERSHIP_BUSY_TIMEOUT", True), ("DEALERSHIP_DATABASE", ""),
    ("DEALERSHIP_DATABASE", 5)])
def test_bad_storage_setting_refuses_to_start(setting, value):
    with pytest.raises(dealership.ConfigError, match=setting):
        new_app({setting: value})


def test_two_apps_on_one_file_see_each_others_writes_at_once(database):
    a, b = on_file(database).test_client(), on_file(database).test_client()
    make_car(a, vin=vin(1))
    assert b.get(f"{API}/cars/1").status_code == 200
    assert book(a, 1).status_code == 201
    assert "booking 1" in assert_problem(book(b, 1), 409)["detail"]
    assert "car 1" in assert_problem(b.post(f"{API}/cars", json=car_body(vin=vin(1))), 409)["detail"]
    assert a.delete(f"{API}/bookings/1").status_code == 204
    assert a.delete(f"{API}/cars/1").status_code == 204
    assert_problem(b.get(f"{API}/cars/1"), 404)
    assert_problem(book(b, 1), 404)
    assert make_car(b, vin=vin(1))["id"] == 2  # the VIN is free again, and ids are shared
    assert a.post(f"{API}/dealers", json={"name": "North"}).status_code == 201
    assert [d["id"] for d in b.get(f"{API}/dealers").get_json()] == [1, 2]
    assert a.put(f"{API}/cars/2", json={"status": "maintenance"}).status_code == 200
    assert b.get(f"{API}/bookings/available-cars", query_string=window("2035-01-01T00:00:00Z",
                                                                        "2035-01-02T00:00:00Z")).get_json() == []
    assert_problem(book(b, 2), 409)
    assert state(a) == state(b)


def test_vins_swapped_through_one_app_are_right_in_the_other(database):
    a, b = on_file(database).test_client(), on_file(database).test_client()
    make_car(a, vin=vin(1))
    make_car(a, vin=vin(2))
    b.get(f"{API}/cars")  # b has seen both cars; now a swaps their VINs in three steps
    for car_id, new in [(1, vin(3)), (2, vin(1)), (1, vin(2))]:
        assert a.patch(f"{API}/cars/{car_id}", json={"vin": new}).status_code == 200
    assert "car 2" in assert_problem(b.post(f"{API}/cars", json=car_body(vin=vin(1))), 409)["detail"]
    assert "car 1" in assert_problem(b.post(f"{API}/cars", json=car_body(vin=vin(2))), 409)["detail"]
    assert make_car(b, vin=vin(3))["id"] == 3


def test_two_apps_times_50_threads_booking_one_slot_get_one_201(database):
    apps = [on_file(database), on_file(database)]
    make_car(apps[0].test_client())
    statuses = run_at_once(100, lambda i: book(apps[i % 2].test_client(), 1).status_code)
    assert sorted(statuses) == [201] + [409] * 99
    for app in apps:
        assert len(app.test_client().get(f"{API}/bookings").get_json()) == 1
    assert len(table_rows(database)["bookings"]) == 1


def test_random_changes_through_two_apps_match_a_brute_force_oracle(database):
    """Bookings, moves, cancellations and VIN changes through either app, read through the other."""
    rng = random.Random(20261125)
    apps = [on_file(database, DEALERSHIP_SYNCHRONOUS="normal").test_client() for _ in range(2)]
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    car_ids = [make_car(apps[0], vin=vin(n))["id"] for n in range(5)]
    vins = {car_id: vin(n) for n, car_id in enumerate(car_ids)}
    oracle = {}  # booking id -> (car id, start, end)

    def free(car_id, start, end, ignore=None):
        return all(not (c == car_id and s < end and start < e) for i, (c, s, e) in oracle.items() if i != ignore)

    def span():
        start = base + timedelta(hours=rng.randrange(0, 150))
        return start, start + timedelta(hours=rng.randrange(1, 12))

    for step in range(300):
        writer, reader = rng.sample(apps, 2)
        roll = rng.random()
        if oracle and roll < 0.2:
            booking_id = rng.choice(list(oracle))
            assert writer.delete(f"{API}/bookings/{booking_id}").status_code == 204
            del oracle[booking_id]
        elif oracle and roll < 0.45:
            booking_id, car_id, (start, end) = rng.choice(list(oracle)), rng.choice(car_ids), span()
            response = patch_booking(writer, booking_id, car_id=car_id, start_datetime=start.isoformat(),
                                     end_datetime=end.isoformat())
            expected = 200 if free(car_id, start, end, ignore=booking_id) else 409
            assert response.status_code == expected, (step, response.get_json())
            if expected == 200:
                oracle[booking_id] = (car_id, start, end)
        elif roll < 0.5:
            car_id, other = rng.sample(car_ids, 2)
            new = vin(100 + step)
            assert writer.patch(f"{API}/cars/{car_id}", json={"vin": new}).status_code == 200
            assert reader.post(f"{API}/cars", json=car_body(vin=vins[car_id])).status_code == 201
            car_ids.append(reader.get(f"{API}/cars").get_json()[-1]["id"])
            vins[car_id], vins[car_ids[-1]] = new, vins[car_id]
            assert writer.patch(f"{API}/cars/{other}", json={"vin": new}).status_code == 409
        else:
            car_id, (start, end) = rng.choice(car_ids), span()
            response = book(writer, car_id, start.isoformat(), end.isoformat())
            if free(car_id, start, end):
                assert response.status_code == 201, (step, response.get_json())
                oracle[response.get_json()["id"]] = (car_id, start, end)
            else:
                assert response.status_code == 409, (step, response.get_json())
        start, end = span()
        answer = reader.get(f"{API}/bookings/available-cars",
                            query_string=window(start.isoformat(), end.isoformat())).get_json()
        assert [car["id"] for car in answer] == [c for c in car_ids if free(c, start, end)]
    listed = {b["id"]: (b["car_id"], datetime.fromisoformat(b["start_datetime"]),
                        datetime.fromisoformat(b["end_datetime"])) for b in apps[1].get(f"{API}/bookings").get_json()}
    assert listed == oracle
    assert state(apps[0]) == state(apps[1]) == state(on_file(database).test_client())


def test_threads_writing_and_reading_through_two_apps_leave_one_consistent_state(database):
    """Readers catch up (on their own connection) while writers of both apps commit: every app ends
    with what the file holds, and no car is double-booked."""
    apps = [on_file(database, DEALERSHIP_SYNCHRONOUS="normal") for _ in range(2)]
    for n in range(4):
        make_car(apps[0].test_client(), vin=vin(n))
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)

    def work(i):
        rng, client = random.Random(i), apps[i % 2].test_client()
        mine, statuses = [], []
        for _ in range(60):
            start = base + timedelta(hours=rng.randrange(0, 100))
            end = (start + timedelta(hours=rng.randrange(1, 8))).isoformat()
            if i % 4 == 3:  # a reader
                statuses.append(client.get(f"{API}/bookings/available-cars",
                                           query_string=window(start.isoformat(), end)).status_code)
                continue
            roll = rng.random()
            if mine and roll < 0.3:
                response = client.delete(f"{API}/bookings/{mine.pop()}")
            elif mine and roll < 0.6:
                response = patch_booking(client, rng.choice(mine), start_datetime=start.isoformat(), end_datetime=end)
            else:
                response = book(client, rng.randrange(1, 5), start.isoformat(), end)
                if response.status_code == 201:
                    mine.append(response.get_json()["id"])
            statuses.append(response.status_code)
        return statuses

    results = run_at_once(16, work)
    assert {status for statuses in results for status in statuses} <= {200, 201, 204, 409}
    final = state(on_file(database).test_client())
    assert state(apps[0].test_client()) == state(apps[1].test_client()) == final
    by_car = {}
    for b in final["bookings"]:
        by_car.setdefault(b["car_id"], []).append((b["start_datetime"], b["end_datetime"]))
    for spans in by_car.values():
        spans.sort()
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))


# Group commit: writes that arrive together share one transaction and one sync to disk

class HeldWriter:
    """A write that holds the store's write path until released, so that other writes queue up
    behind it (as they do under load); then they run in the batches the store makes of them."""

    def __init__(self, store):
        self.store, self.release = store, threading.Event()
        self.thread = threading.Thread(target=store.queue.submit, args=(lambda db, job: self.release.wait(30),))
        self.thread.start()
        wait_until(lambda: store.queue.leading and not store.queue.jobs)

    def queue(self, action):
        """Start `action` in a thread of its own and wait until its write is in the queue."""
        queued, results = len(self.store.queue.jobs), []
        thread = threading.Thread(target=lambda: results.append(action()))
        thread.start()
        wait_until(lambda: len(self.store.queue.jobs) == queued + 1)
        return thread, results

    def let_go(self, *threads):
        self.release.set()
        for thread in (self.thread, *threads):
            thread.join(timeout=30)


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def commits(store):
    """A list that gets one entry for every COMMIT the store's write connection runs."""
    seen = []
    store.engine._writer.conn.set_trace_callback(lambda sql: seen.append(sql) if sql == "COMMIT" else None)
    return seen


def five_bookings_at_once(app, before_queueing=lambda store: None):
    """Four cars (car 3 in maintenance), and five bookings queued behind a held write, in this order:
    car 1, car 2, car 3, car 1 again (overlapping the first), car 4. Their responses, once let go."""
    client, store = app.test_client(), app.extensions["dealership"]
    for n in range(4):
        make_car(client, vin=vin(n), status="maintenance" if n == 2 else "available")
    before_queueing(store)
    held = HeldWriter(store)
    queued = [held.queue(lambda car=car, start=start: book(client, car, start, end))
              for car, start, end in [(1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z"),
                                      (2, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z"),
                                      (3, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z"),
                                      (1, "2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z"),
                                      (4, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")]]
    held.let_go(*(thread for thread, _ in queued))
    responses = [results[0] for _, results in queued]
    assert [r.status_code for r in responses] == [201, 201, 409, 409, 201]
    assert "maintenance" in responses[2].get_json()["detail"] and "booking 1" in responses[3].get_json()["detail"]
    assert [(b["id"], b["car_id"]) for b in client.get(f"{API}/bookings").get_json()] == [(1, 1), (2, 2), (3, 4)]
    return client


@pytest.mark.parametrize("on_a_file", [False, True])
def test_bookings_that_arrive_together_share_one_commit_and_a_refusal_undoes_only_its_own(sqlite_file, on_a_file):
    app, traced = on_file(sqlite_file) if on_a_file else new_app({"DEALERSHIP_DATABASE": ":memory:"}), []
    client = five_bookings_at_once(app, lambda store: traced.append(commits(store)))
    # the held write, then [car 1, car 2, car 3 refused], then [car 1 again, refused; car 4]: the second car 1
    # waited for a batch of its own, so it was checked against the first
    assert len(traced[0]) == 3  # COMMITs
    if on_a_file:
        assert [row[:2] for row in table_rows(sqlite_file)["bookings"]] == [(1, 1), (2, 2), (3, 4)]
        assert state(on_file(sqlite_file).test_client()) == state(client)


def test_on_postgresql_bookings_that_arrive_together_share_one_transaction_each_under_its_savepoint(postgres_database):
    client = five_bookings_at_once(on_file(postgres_database))
    # the change log names each change's transaction: bookings 1 and 2 committed together, 3 after
    together = sql(postgres_database, "SELECT array_agg(id ORDER BY id) FROM changes WHERE kind = 'booking' "
                                      "GROUP BY xid ORDER BY min(seq)")
    assert [row[0] for row in together] == [[1, 2], [3]]
    assert [row[:2] for row in table_rows(postgres_database)["bookings"]] == [(1, 1), (2, 2), (3, 4)]
    assert state(on_file(postgres_database).test_client()) == state(client)


def test_a_failed_commit_refuses_every_write_of_its_batch_and_keeps_none(sqlite_file):
    app = on_file(sqlite_file)
    client, store = app.test_client(), app.extensions["dealership"]
    for n in range(3):
        make_car(client, vin=vin(n))
    before, rows = state(client), table_rows(sqlite_file)

    class FailingSecondCommit:
        """The write connection, but its second COMMIT fails as a full or broken disk would."""
        def __init__(self, conn):
            self.conn, self.commits = conn, 0

        def execute(self, sql, *args):
            if sql == "COMMIT":
                self.commits += 1
                if self.commits == 2:
                    raise sqlite3.OperationalError("disk I/O error")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    store.engine._writer.conn = FailingSecondCommit(store.engine._writer.conn)
    held = HeldWriter(store)
    queued = [held.queue(lambda car=car: book(client, car)) for car in (1, 2, 3)]
    held.let_go(*(thread for thread, _ in queued))
    for _, (response,) in queued:
        assert response.status_code == 503 and "nothing was changed" in response.get_json()["detail"]
    assert state(client) == before and table_rows(sqlite_file) == rows
    assert book(client, 1).status_code == 201  # the next batch commits


def test_many_threads_booking_on_one_file_keep_every_acknowledged_booking_and_no_overlap(database):
    app = on_file(database)
    for n in range(3):
        make_car(app.test_client(), vin=vin(n))
    base = datetime(2035, 2, 1, tzinfo=timezone.utc)

    def work(i):
        rng, client, made = random.Random(i), app.test_client(), []
        for _ in range(30):
            start = base + timedelta(hours=rng.randrange(0, 200))
            response = book(client, rng.randrange(1, 4), start.isoformat(), (start + timedelta(hours=2)).isoformat())
            assert response.status_code in (201, 409), response.get_json()
            if response.status_code == 201:
                made.append(response.get_json())
        return made

    made = [booking for found in run_at_once(12, work) for booking in found]
    stored = state(on_file(database).test_client())["bookings"]
    assert sorted(made, key=lambda b: b["id"]) == sorted(stored, key=lambda b: b["id"])
    assert stored == state(app.test_client())["bookings"]
    for car_id in (1, 2, 3):
        spans = sorted((b["start_datetime"], b["end_datetime"]) for b in stored if b["car_id"] == car_id)
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))


REFUSALS = [
    ("post", "/bookings", booking_body(1, "2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z"), 409),
    ("post", "/bookings", booking_body(9), 404),
    ("post", "/bookings", booking_body(1, end="2035-01-15T09:00:00Z"), 422),
    ("patch", "/bookings/1", {"car_id": 2, "end_datetime": "2035-01-15T12:30:00Z"}, 409),
    ("patch", "/bookings/1", {"end_datetime": "2035-01-15T09:00:00Z"}, 422),
    ("post", "/cars", car_body(vin=vin(2)), 409),
    ("post", "/cars", car_body(vin=vin(5), dealer_id=7), 404),
    ("put", "/cars/2", {"vin": vin(1)}, 409),
    ("delete", "/cars/1", None, 409),
    ("delete", "/dealers/1", None, 409),
    ("post", "/cars/1/maintenance-windows", window("2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z"), 409),
    ("post", "/cars/2/maintenance-windows", window("2035-01-16T11:00:00Z", "2035-01-16T13:00:00Z"), 409),
    ("post", "/cars/9/maintenance-windows", window("2035-01-16T11:00:00Z", "2035-01-16T13:00:00Z"), 404),
    ("post", "/cars/1/maintenance-windows", window("2035-01-17T11:00:00Z", "2035-01-17T13:00:00Z") | {"note": "x" * 201}, 422),
    ("post", "/bookings", booking_body(2, "2035-01-16T11:00:00Z", "2035-01-16T13:00:00Z"), 409),
    ("patch", "/bookings/1", {"car_id": 2, "start_datetime": "2035-01-16T09:00:00Z",
                              "end_datetime": "2035-01-16T10:30:00Z"}, 409),
    ("delete", "/cars/2/maintenance-windows/9", None, 404),
    ("delete", "/cars/1/maintenance-windows/1", None, 404),
    ("patch", "/dealers/1", {"turnaround_minutes": 1441}, 422),
    ("patch", "/dealers/9", {"turnaround_minutes": 5}, 404),
]


@pytest.mark.parametrize("method, path, body, status", REFUSALS)
def test_a_refusal_changes_neither_the_database_nor_the_dicts(database, method, path, body, status):
    client = on_file(database).test_client()
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    book(client, 1)
    book(client, 2, "2035-01-15T12:00:00Z", "2035-01-15T14:00:00Z")
    assert client.post(f"{API}/cars/2/maintenance-windows",
                       json=window("2035-01-16T10:00:00Z", "2035-01-16T12:00:00Z")).status_code == 201
    before, rows = state(client), table_rows(database)
    assert_problem(getattr(client, method)(API + path, json=body), status)
    assert state(client) == before
    assert table_rows(database) == rows
    assert state(on_file(database).test_client()) == before
    assert make_car(client, vin=vin(3))["id"] == 3  # and no id was used up
    assert book(client, 3).get_json()["id"] == 3
    assert client.post(f"{API}/cars/3/maintenance-windows",
                       json=window("2035-01-16T10:00:00Z", "2035-01-16T12:00:00Z")).get_json()["id"] == 2


@contextmanager
def read_only(path):
    """Make the file read-only for real: for root, whom permissions do not stop, immutable."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
            pytest.skip("this file system cannot make a file immutable (chattr +i)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", path], check=True)
    else:
        os.chmod(path, 0o444)
        try:
            yield
        finally:
            os.chmod(path, 0o644)


def test_a_read_only_file_answers_reads_and_refuses_writes_with_503(sqlite_file):
    client = on_file(sqlite_file).test_client()
    make_car(client)
    book(client, 1)
    del client
    gc.collect()  # closes the first app's connection, so the file is checkpointed and complete
    with read_only(sqlite_file):
        client = on_file(sqlite_file).test_client()
        before = state(client)
        assert len(before["bookings"]) == 1
        for method, path, body in [("post", "/cars", car_body(vin=vin(2))), ("post", "/bookings", booking_body(1, "2035-02-01T10:00:00Z", "2035-02-01T11:00:00Z")),
                                   ("delete", "/bookings/1", None), ("patch", "/cars/1", {"color": "Red"})]:
            response = getattr(client, method)(API + path, json=body)
            assert "read-only" in assert_problem(response, 503)["detail"]
            assert int(response.headers["Retry-After"]) > 0
        assert state(client) == before
        assert client.get("/health").status_code == 200


def test_a_busy_database_gives_503_and_changes_nothing(sqlite_file):
    client = on_file(sqlite_file, DEALERSHIP_BUSY_TIMEOUT=0.2).test_client()
    make_car(client)
    before = state(client)
    with closing(sqlite3.connect(sqlite_file, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        response = book(client, 1)
        assert "busy" in assert_problem(response, 503)["detail"]
        assert response.headers["Retry-After"] == "1"
        assert state(client) == before  # reads keep working
        other.execute("ROLLBACK")
    assert state(client) == before
    assert book(client, 1).status_code == 201


def test_a_full_disk_gives_503_and_changes_nothing(sqlite_file):
    app = on_file(sqlite_file)
    client = app.test_client()
    db = app.extensions["dealership"].engine._writer
    pages = db.conn.execute("PRAGMA page_count").fetchone()[0]
    db.conn.execute(f"PRAGMA max_page_count = {pages}")  # as if the disk were full from here on
    for n in range(1000):
        before, rows = state(client), table_rows(sqlite_file)
        response = client.post(f"{API}/cars", json=car_body(vin=vin(n), model="x" * 100))
        if response.status_code != 201:
            break
    assert "full" in assert_problem(response, 503)["detail"]
    assert state(client) == before
    assert table_rows(sqlite_file) == rows


def test_health_is_503_when_the_database_does_not_answer(sqlite_file):
    client = on_file(sqlite_file).test_client()
    make_car(client)
    assert client.get("/health").get_json() == {"status": "ok", "database": "ok"}
    with closing(sqlite3.connect(sqlite_file)) as other:
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the file itself
    with open(sqlite_file, "r+b") as f:
        f.write(b"overwritten by mistake" * 10)  # the file is damaged under the running service
    response = client.get("/health")
    assert "does not answer" in assert_problem(response, 503)["detail"]
    assert response.headers["Retry-After"]
    assert len(client.get(f"{API}/cars").get_json()) == 1  # reads are answered from memory
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2))), 503)
    assert len(client.get(f"{API}/cars").get_json()) == 1


def test_the_change_log_stays_bounded_and_a_lagging_app_converges(database, monkeypatch, caplog):
    monkeypatch.setattr(dealership, "CHANGE_LOG_KEEP", 200)
    monkeypatch.setattr(dealership, "CHANGE_LOG_PRUNE_EVERY", 50)
    writer = on_file(database, DEALERSHIP_SYNCHRONOUS="normal", DEALERSHIP_HISTORY_DAYS=0).test_client()
    near, far = on_file(database).test_client(), on_file(database).test_client()
    make_car(writer)
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    for n in range(3000):
        start = base + timedelta(hours=n)
        response = book(writer, 1, start.isoformat(), (start + timedelta(hours=1)).isoformat())
        if n % 3:
            assert writer.delete(f"{API}/bookings/{response.get_json()['id']}").status_code == 204
        if n % 100 == 0:
            assert sql(database, "SELECT count(*) FROM changes")[0][0] <= 250
            state(near)  # keeps up: catches up from the log
    with caplog.at_level("INFO", logger="dealership"):
        assert state(near) == state(writer)
        assert "loading everything again" not in caplog.text
        assert state(far) == state(writer)  # 4,000 changes behind, past the log: reloads in full
        assert "loading everything again" in caplog.text
    assert len(state(far)["bookings"]) == 1000


def test_demo_data_is_loaded_only_into_an_empty_database(database):
    first = on_file(database, DEALERSHIP_DEMO_DATA=True).test_client()
    again = on_file(database, DEALERSHIP_DEMO_DATA=True).test_client()
    assert len(first.get(f"{API}/cars").get_json()) == 6
    assert state(again) == state(first)


@pytest.mark.parametrize("content, message", [
    (b"this is not a database, it is a text file\n" * 100, "is not a SQLite database"),
    (None, "another application"),
])
def test_a_file_that_is_not_ours_refuses_to_start(sqlite_file, content, message):
    if content is None:
        with closing(sqlite3.connect(sqlite_file)) as conn:
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    else:
        with open(sqlite_file, "wb") as f:
            f.write(content)
    with pytest.raises(dealership.ConfigError, match=message) as refused:
        on_file(sqlite_file)
    assert sqlite_file in str(refused.value)


def test_a_file_from_a_newer_version_refuses_to_start(sqlite_file):
    on_file(sqlite_file)
    gc.collect()
    with closing(sqlite3.connect(sqlite_file)) as conn:
        conn.execute(f"PRAGMA user_version = {dealership.SCHEMA_VERSION + 1}")
    with pytest.raises(dealership.ConfigError, match="newer version"):
        on_file(sqlite_file)


def test_a_damaged_file_refuses_to_start(sqlite_file):
    client = on_file(sqlite_file).test_client()
    for n in range(40):
        make_car(client, vin=vin(n))
    del client
    gc.collect()
    with closing(sqlite3.connect(sqlite_file)) as conn:
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'cars'").fetchone()[0]
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(sqlite_file, "r+b") as f:
        f.seek((root - 1) * page_size)
        f.write(b"\xff" * 16)  # the table's first page no longer makes sense
    with pytest.raises(dealership.ConfigError, match="is damaged.*restore"):
        on_file(sqlite_file)


def test_a_folder_that_does_not_exist_refuses_to_start(tmp_path):
    with pytest.raises(dealership.ConfigError, match="does not exist"):
        on_file(str(tmp_path / "missing" / "dealership.sqlite3"))
    assert not (tmp_path / "missing").exists()  # only the instance folder is the service's to make


def test_flask_run_refuses_a_bad_file_in_one_line(tmp_path):
    bad = tmp_path / "notes.sqlite3"
    bad.write_text("not a database\n" * 100)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {"DEALERSHIP_DATABASE": str(bad)}
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "dealership", "run", "--port", "0"],
                          cwd=os.path.dirname(os.path.abspath(dealership.__file__)), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]  # one log line, its time and process first
    assert LOG_LINE.match(last) and " ERROR " in last and last.endswith(
        f"dealership: DEALERSHIP_DATABASE='{bad}' is not a SQLite database: point the setting at the service's own file.")
    assert "Traceback" not in done.stderr


def test_backup_writes_a_consistent_copy_while_the_service_runs(sqlite_file, tmp_path):
    app = on_file(sqlite_file, DEALERSHIP_SYNCHRONOUS="normal")
    client = app.test_client()
    make_car(client)
    stop = threading.Event()

    def keep_booking():
        writer = on_file(sqlite_file, DEALERSHIP_SYNCHRONOUS="normal").test_client()
        hour = 0
        while not stop.is_set() and hour < 5000:
            start = datetime(2035, 1, 1, tzinfo=timezone.utc) + timedelta(hours=hour)
            assert book(writer, 1, start.isoformat(), (start + timedelta(hours=1)).isoformat()).status_code == 201
            hour += 1

    thread = threading.Thread(target=keep_booking)
    thread.start()
    try:
        time.sleep(0.2)
        copy = str(tmp_path / "backup.sqlite3")
        result = app.test_cli_runner().invoke(args=["backup", copy])
    finally:
        stop.set()
        thread.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Backed up {sqlite_file} to {copy}: 1 dealer, 1 car, ")
    assert re.search(r" bookings?, 0 maintenance windows\.$", result.output.rstrip())
    assert not os.path.exists(copy + ".partial")
    with closing(sqlite3.connect(copy)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)  # one self-contained file
    restored = on_file(copy).test_client()
    booked = state(restored)["bookings"]
    assert f"{len(booked)} booking" in result.output and booked
    assert [b["id"] for b in booked] == list(range(1, len(booked) + 1))  # a prefix of what was written


def test_backup_of_a_memory_database_says_there_is_nothing_to_copy(tmp_path):
    result = new_app({"DEALERSHIP_DATABASE": ":memory:"}).test_cli_runner().invoke(args=["backup", str(tmp_path / "copy.sqlite3")])
    assert result.exit_code != 0
    assert "no file to back up" in result.output


# ---------------------------------------------------------------------------------------------
# Storage: PostgreSQL, one database for several machines (here: apps), and its own guards
# ---------------------------------------------------------------------------------------------


@contextmanager
def postgres(database):
    """A connection of its own to the test's PostgreSQL database, as another program (or psql) has."""
    import psycopg

    with psycopg.connect(database, autocommit=True) as conn:
        yield conn


def test_postgresql_keeps_times_in_utc_and_refuses_what_breaks_a_rule_whoever_writes(postgres_database):
    import psycopg

    client = on_file(postgres_database).test_client()
    set_turnaround(client, 30)
    make_car(client, vin=vin(1))
    book(client, 1, "2035-01-15T10:00:00+02:00", "2035-01-15T12:00:00+02:00")
    assert table_rows(postgres_database)["bookings"][0][4:] == (
        "2035-01-15T08:00:00.000000+00:00", "2035-01-15T10:00:00.000000+00:00", 10000, 1, "open")
    before = table_rows(postgres_database)
    insert = ("INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
              "VALUES (%s, 'x', 'x@example.com', %s, %s)")
    with postgres(postgres_database) as conn:
        for params, refusal in [
            ((1, "2035-01-15T09:00:00Z", "2035-01-15T11:00:00Z"), psycopg.errors.ExclusionViolation),  # overlap
            ((1, "2035-01-15T10:20:00Z", "2035-01-15T11:00:00Z"), psycopg.errors.ExclusionViolation),  # turnaround
            ((1, "2035-01-15T07:45:00Z", "2035-01-15T08:00:00Z"), psycopg.errors.ExclusionViolation),  # before it
            ((1, "2035-01-16T10:00:00Z", "2035-01-16T09:00:00Z"), psycopg.errors.CheckViolation),
            ((99, "2035-01-16T10:00:00Z", "2035-01-16T11:00:00Z"), psycopg.errors.ForeignKeyViolation),
        ]:
            with pytest.raises(refusal):
                conn.execute(insert, params)
        with pytest.raises(psycopg.errors.ExclusionViolation):  # a window is in the same constraint
            conn.execute("INSERT INTO maintenance_windows (car_id, start_datetime, end_datetime) "
                         "VALUES (1, '2035-01-15T10:10:00Z', '2035-01-15T12:00:00Z')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO cars (brand, model, year, color, daily_price, vin, status, dealer_id) "
                         f"VALUES ('a', 'b', 2020, 'c', 1.0, '{vin(1)}', 'available', 1)")
        conn.execute(insert, (1, "2035-01-15T10:30:00Z", "2035-01-15T11:00:00Z"))  # right after the turnaround
    assert len(table_rows(postgres_database)["bookings"]) == len(before["bookings"]) + 1
    assert book(client, 1, "2035-01-15T11:00:00Z", "2035-01-15T11:20:00Z").status_code == 409  # the service sees it


def test_a_lower_turnaround_frees_time_in_the_constraint_too_and_a_higher_one_keeps_what_is_booked(postgres_database):
    client = on_file(postgres_database).test_client()
    set_turnaround(client, 60)
    make_car(client)
    book(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")
    assert book(client, 1, "2035-01-15T12:30:00Z", "2035-01-15T13:00:00Z").status_code == 409
    set_turnaround(client, 15)
    assert book(client, 1, "2035-01-15T12:30:00Z", "2035-01-15T13:00:00Z").status_code == 201
    set_turnaround(client, 120)  # what is booked stays valid; what comes next keeps two hours' distance
    assert patch_booking(client, 2, customer_name="Grace Hopper").status_code == 200
    assert book(client, 1, "2035-01-15T14:00:00Z", "2035-01-15T15:00:00Z").status_code == 409
    assert book(client, 1, "2035-01-15T15:00:00Z", "2035-01-15T16:00:00Z").status_code == 201
    client.post(f"{API}/dealers", json={"name": "South", "location": "Rome", "turnaround_minutes": 0})
    assert client.patch(f"{API}/cars/1", json={"dealer_id": 2}).status_code == 200  # a dealer without turnaround
    assert book(client, 1, "2035-01-15T16:00:00Z", "2035-01-15T17:00:00Z").status_code == 201


def test_a_transaction_that_commits_after_a_later_one_is_still_seen(postgres_database):
    """Change log entries are numbered when written, not when committed: 'the largest number seen'
    would miss the first transaction here for ever."""
    client = on_file(postgres_database).test_client()
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    insert = ("INSERT INTO bookings (car_id, customer_name, customer_email, start_datetime, end_datetime) "
              "VALUES (%s, 'x', 'x@example.com', '2035-01-15T10:00:00Z', '2035-01-15T11:00:00Z')")
    with postgres(postgres_database) as first, postgres(postgres_database) as second:
        first.execute("BEGIN")
        first.execute(insert, (1,))  # takes the lower number
        second.execute(insert, (2,))  # a higher one, committed at once
        assert [b["car_id"] for b in client.get(f"{API}/bookings").get_json()] == [2]
        first.execute("COMMIT")
    assert [b["car_id"] for b in client.get(f"{API}/bookings").get_json()] == [1, 2]
    assert book(client, 1, "2035-01-15T10:30:00Z", "2035-01-15T11:30:00Z").status_code == 409


def test_a_clash_only_the_constraint_saw_is_told_as_the_service_tells_it(postgres_database, monkeypatch):
    """A writer whose fleet missed a booking (here: a check skipped once) is refused by the database;
    the transaction runs again, caught up, and the client hears the usual 409."""
    client = on_file(postgres_database).test_client()
    make_car(client)
    book(client, 1)
    checks, real = [], dealership.Fleet.bookable_car

    def blind_once(fleet, car_id, start, end, ignore=None):
        checks.append(car_id)
        return fleet.car(car_id) if len(checks) == 1 else real(fleet, car_id, start, end, ignore)
    monkeypatch.setattr(dealership.Fleet, "bookable_car", blind_once)
    refused = book(client, 1, "2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z")
    assert assert_problem(refused, 409)["detail"] == (
        "Car 1 is already booked from 2035-01-15T10:00:00+00:00 to 2035-01-15T12:00:00+00:00 by booking 1.")
    assert len(checks) == 2 and len(table_rows(postgres_database)["bookings"]) == 1


def test_a_car_locked_by_another_writer_for_too_long_gives_503_and_changes_nothing(postgres_database):
    client = on_file(postgres_database, DEALERSHIP_BUSY_TIMEOUT=0.2).test_client()
    make_car(client)
    before, rows = state(client), table_rows(postgres_database)
    with postgres(postgres_database) as other:
        other.execute("BEGIN")
        other.execute("SELECT * FROM cars WHERE id = 1 FOR UPDATE")
        response = book(client, 1)
        other.execute("ROLLBACK")
    assert "busy" in assert_problem(response, 503)["detail"] and response.headers["Retry-After"] == "1"
    assert state(client) == before and table_rows(postgres_database) == rows
    assert book(client, 1).status_code == 201


def test_connections_cut_by_the_server_are_replaced_without_a_restart(postgres_database):
    app = on_file(postgres_database)
    client = app.test_client()
    make_car(client)
    with postgres(postgres_database) as admin:
        cut = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
    assert cut >= 1
    assert book(client, 1).status_code == 201  # a connection lost before COMMIT: the write runs again
    assert len(client.get(f"{API}/cars").get_json()) == 1
    assert client.get("/health").get_json()["database"] == "ok"
    assert len(table_rows(postgres_database)["bookings"]) == 1


def test_a_read_after_the_servers_connections_were_cut_still_sees_what_another_process_wrote(postgres_database):
    reader, writer = on_file(postgres_database), on_file(postgres_database)
    make_car(reader.test_client())
    assert reader.test_client().get(f"{API}/bookings").get_json() == []  # its connection is in its pool
    with postgres(postgres_database) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    assert book(writer.test_client(), 1).status_code == 201  # its own connection lost too: the write runs again
    seen = reader.test_client().get(f"{API}/bookings")  # its pooled connection is broken: the read takes another
    assert [booking["id"] for booking in seen.get_json()] == [1]


def test_a_connection_lost_during_commit_is_a_503_that_says_the_outcome_is_unknown(postgres_database):
    client = on_file(postgres_database).test_client()
    make_car(client)
    with postgres(postgres_database) as admin:  # at COMMIT, the server ends the connection that commits
        admin.execute("CREATE FUNCTION hang_up() RETURNS trigger LANGUAGE plpgsql AS $$ "
                      "BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$")
        admin.execute("CREATE CONSTRAINT TRIGGER hang_up AFTER INSERT ON bookings DEFERRABLE INITIALLY DEFERRED "
                      "FOR EACH ROW EXECUTE FUNCTION hang_up()")
        response = book(client, 1)
        admin.execute("DROP TRIGGER hang_up ON bookings")
    assert "may or may not have been made" in assert_problem(response, 503)["detail"]
    assert client.get(f"{API}/bookings").get_json() == []  # this one was not: nothing is made up
    assert book(client, 1).status_code == 201


@pytest.mark.parametrize("method, path, body", [("patch", "/bookings/1", {"customer_name": "Grace Hopper"}),
                                                ("delete", "/bookings/1", None)])
def test_a_write_on_a_record_another_process_removed_meanwhile_runs_again_and_never_puts_it_back(
        database, monkeypatch, method, path, body):
    client = on_file(database).test_client()
    make_car(client)
    book(client, 1)
    sql(database, "DELETE FROM bookings WHERE id = 1")  # another program, after this one caught up
    real_sync, real_catch_up, blind = dealership.Store.sync, dealership.Store._catch_up, ["sync", "catch up"]
    monkeypatch.setattr(dealership.Store, "sync", lambda store: blind.remove("sync") if "sync" in blind
                        else real_sync(store))
    monkeypatch.setattr(dealership.Store, "_catch_up", lambda store, db: blind.remove("catch up")
                        if "catch up" in blind else real_catch_up(store, db))
    assert_problem(getattr(client, method)(API + path, json=body), 404)  # once caught up, as it is
    assert blind == [] and client.get(f"{API}/bookings").get_json() == []
    assert table_rows(database)["bookings"] == []


def test_a_process_whose_log_position_the_server_no_longer_knows_loads_everything_again(postgres_database, caplog):
    app = on_file(postgres_database)
    client, store = app.test_client(), app.extensions["dealership"]
    make_car(client)
    stale = store.position = dealership.LogPosition(store.position.horizon + 1_000_000)  # as before a failover
    insert_booking(postgres_database, 1, datetime(2035, 1, 15, 10, tzinfo=timezone.utc),
                   datetime(2035, 1, 15, 12, tzinfo=timezone.utc))
    with caplog.at_level("INFO", logger="dealership"):
        assert [b["car_id"] for b in client.get(f"{API}/bookings").get_json()] == [1]
    assert "loading everything again" in caplog.text
    assert store.position.horizon < stale.horizon


def test_health_on_postgresql_tells_the_pool(postgres_database):
    body = on_file(postgres_database, DEALERSHIP_POOL_SIZE=3).test_client().get("/health").get_json()
    assert body["status"] == body["database"] == "ok"
    assert body["pool"]["max"] == 3 and 1 <= body["pool"]["size"] <= 3


def test_health_on_postgresql_waits_for_the_pool_at_most_a_moment_and_does_not_call_the_database_down(
        postgres_database):
    app = on_file(postgres_database, DEALERSHIP_POOL_SIZE=2, DEALERSHIP_BUSY_TIMEOUT=30)
    client, pool = app.test_client(), app.extensions["dealership"].engine.pool
    held = [pool.getconn() for _ in range(2)]  # every connection lent, for longer than a probe waits
    try:
        answer = client.get("/health")
        assert_problem(answer, 503)
        assert "does not answer" in answer.get_json()["detail"]
    finally:
        for conn in held:
            pool.putconn(conn)
    assert client.get("/health").status_code == 200
    assert make_car(client)["id"] == 1  # a busy pool is not a database down: writes go on at once


@pytest.mark.parametrize("url, message", [
    ("postgresql://nobody@/no_such_database?host=/no/such/folder",
     "DEALERSHIP_DATABASE: cannot use the PostgreSQL database 'no_such_database' on /no/such/folder: "),
    ("postgresql://nobody:secret@127.0.0.1:1/shop?connect_timeout=1",
     "DEALERSHIP_DATABASE: cannot use the PostgreSQL database 'shop' on 127.0.0.1:1: "),
    ("postgresql://host/db?nonsense=1", "DEALERSHIP_DATABASE: cannot use the PostgreSQL (a URL that cannot be read)"),
])
def test_a_database_that_cannot_be_reached_is_one_clear_line_at_start(url, message):
    with pytest.raises(dealership.ConfigError) as refused:
        on_file(url)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_postgresql_database_of_another_application_or_a_newer_version_refuses_to_start(postgres_database):
    with postgres(postgres_database) as conn:
        conn.execute("CREATE TABLE invoices (id integer)")
    with pytest.raises(dealership.ConfigError, match="tables of another application"):
        on_file(postgres_database)
    with postgres(postgres_database) as conn:
        conn.execute("DROP TABLE invoices")
    on_file(postgres_database)
    with postgres(postgres_database) as conn:
        conn.execute("UPDATE dealership_schema SET version = version + 1")
    with pytest.raises(dealership.ConfigError, match="newer version of the service"):
        on_file(postgres_database)


def test_serve_says_when_its_threads_would_wait_for_postgresql_connections(postgres_database, caplog):
    app = on_file(postgres_database, DEALERSHIP_POOL_SIZE=4)
    with caplog.at_level("WARNING", logger="dealership"):  # an address it cannot listen on: it stops there
        app.test_cli_runner().invoke(args=["serve", "--threads", "8", "--host", "256.0.0.1", "--workers", "1"])
    assert "--threads 8 is more than DEALERSHIP_POOL_SIZE=4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dealership"):
        app.test_cli_runner().invoke(args=["serve", "--threads", "4", "--host", "256.0.0.1", "--workers", "1"])
    assert "DEALERSHIP_POOL_SIZE" not in caplog.text


def test_backup_on_postgresql_gives_the_pg_dump_command_instead(postgres_database, tmp_path):
    app = on_file(postgres_database)
    result = app.test_cli_runner().invoke(args=["backup", str(tmp_path / "copy.dump")])
    assert result.exit_code != 0
    assert f"pg_dump --format=custom --file={tmp_path / 'copy.dump'} " in result.output
    assert not (tmp_path / "copy.dump").exists()


def filled(database):
    """An app on `database` with a bit of everything: two dealers (one with turnaround), cars, bookings
    and a maintenance window, and records deleted (their ids are never given again)."""
    client = on_file(database).test_client()
    client.post(f"{API}/dealers", json={"name": "North", "location": "Hamburg", "turnaround_minutes": 45})
    for n in range(1, 5):
        make_car(client, vin=vin(n), dealer_id=1 + n % 2)
    book(client, 1)
    book(client, 2, "2035-01-15T12:30:00Z", "2035-01-15T14:00:00Z")
    book(client, 2, "2035-01-16T12:30:00Z", "2035-01-16T14:00:00Z")
    book(client, 3, "2035-01-15T12:30:00Z", "2035-01-15T14:00:00Z")
    set_turnaround(client, 120, dealer_id=2)  # raised: what is booked stays as it is
    open_window(client, 1, "2035-01-20T08:00:00Z", "2035-01-20T10:00:00Z")
    assert client.delete(f"{API}/bookings/4").status_code == 204
    assert client.delete(f"{API}/cars/4").status_code == 204
    return client


@pytest.mark.parametrize("target_engine", ENGINES)
def test_copy_to_moves_every_record_ids_kept_and_back_again(tmp_path, request, target_engine):
    source = str(tmp_path / "source.sqlite3")
    before = state(filled(source))
    target = request.getfixturevalue("postgres_database") if target_engine == "postgresql" else \
        str(tmp_path / "target.sqlite3")
    result = on_file(source).test_cli_runner().invoke(args=["copy-to", target])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Copied 2 dealers, 3 cars, 3 bookings, 1 maintenance window and 0 API keys from ")
    moved = on_file(target).test_client()
    assert state(moved) == before
    assert make_car(moved, vin=vin(9))["id"] == 5  # past the deleted car's id, as at the source
    assert book(moved, 1, "2035-02-01T10:00:00Z", "2035-02-01T11:00:00Z").get_json()["id"] == 5
    assert book(moved, 1, "2035-01-15T13:00:00Z", "2035-01-15T13:30:00Z").status_code == 409  # its turnaround came along

    again = on_file(target).test_cli_runner().invoke(args=["copy-to", source])  # into a database that has data
    assert again.exit_code != 0 and "already holds records" in again.output and "Nothing was copied" in again.output
    back = str(tmp_path / "back.sqlite3")
    assert on_file(target).test_cli_runner().invoke(args=["copy-to", back]).exit_code == 0
    assert state(on_file(back).test_client()) == state(moved)
    assert make_car(on_file(back).test_client(), vin=vin(10))["id"] == 6


# ---------------------------------------------------------------------------------------------
# Embedding in a host app
# ---------------------------------------------------------------------------------------------


def test_embedding_keeps_the_host_as_it_was():
    host = host_app("host")

    @host.get("/")
    def home():
        return "<h1>Host</h1>"

    @host.errorhandler(404)
    def host_404(error):
        return "<h1>Nothing here</h1>", 404

    dealership.init_app(host, url_prefix="/dealership/api/v1")
    client = host.test_client()
    assert client.get("/").data == b"<h1>Host</h1>"
    missing = client.get("/missing")
    assert (missing.status_code, missing.mimetype, missing.data) == (404, "text/html", b"<h1>Nothing here</h1>")
    created = client.post("/dealership/api/v1/cars", json=car_body())
    assert created.status_code == 201
    assert created.headers["Location"] == "/dealership/api/v1/cars/1"
    assert_problem(client.get("/dealership/api/v1/cars/2"), 404)
    assert_problem(client.post("/dealership/api/v1/cars", json={}), 422, "brand")
    assert_problem(client.post("/dealership/api/v1/cars", data="x", content_type="text/plain"), 415)
    assert host.extensions["dealership"] is not new_app().extensions["dealership"]


# ---------------------------------------------------------------------------------------------
# The OpenAPI document and the interactive docs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["/api/v1", "/my prefix/v1", "/é/x", "/a:b@c;d=e", "/100%"])
@pytest.mark.parametrize("root", ["", "/s p", "/été"])
def test_the_location_of_a_new_record_is_what_url_for_writes(prefix, root):
    """Made from the collection's URL (no url_for per request): the same text under any mount."""
    from flask import url_for
    from urllib.parse import quote
    from werkzeug.urls import iri_to_uri

    host = host_app("host")
    dealership.init_app(host, url_prefix=prefix)
    client = host.test_client()
    base = f"http://localhost{quote(root)}/"
    at = quote(prefix)
    made = {
        "dealer": client.post(f"{at}/dealers", base_url=base, json={"name": "North"}),
        "car": client.post(f"{at}/cars", base_url=base, json=car_body()),
        "window": client.post(f"{at}/cars/1/maintenance-windows", base_url=base,
                              json={"start_datetime": "2035-01-10T10:00:00Z", "end_datetime": "2035-01-10T12:00:00Z"}),
        "booking": client.post(f"{at}/bookings", base_url=base, json=booking_body(1)),
    }
    with host.test_request_context(base_url=base):  # as a response sends it: Werkzeug quotes a Location
        expected = {"dealer": iri_to_uri(url_for("dealership.get_dealer", dealer_id=2)),
                    "car": iri_to_uri(url_for("dealership.get_car", car_id=1)),
                    "window": iri_to_uri(url_for("dealership.get_window", car_id=1, window_id=1)),
                    "booking": iri_to_uri(url_for("dealership.get_booking", booking_id=1))}
    assert {kind: response.status_code for kind, response in made.items()} == dict.fromkeys(made, 201)
    assert {kind: response.headers["Location"] for kind, response in made.items()} == expected
    for kind, response in made.items():  # and each leads to what was made
        assert client.get(response.headers["Location"][len(quote(root)):], base_url=base).get_json() == \
            response.get_json(), kind
    padded = client.post(f"{at}/cars/001/maintenance-windows", base_url=base,
                         json={"start_datetime": "2035-01-11T10:00:00Z", "end_datetime": "2035-01-11T12:00:00Z"})
    assert padded.headers["Location"] == expected["window"][:-1] + "2"  # the car's id as url_for writes it


def openapi_path(rule):
    return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule)


def test_openapi_document_is_valid(client):
    from openapi_spec_validator import validate

    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    validate(document)
    assert document["info"]["title"] == "Dealership API"
    assert "half-open" in document["info"]["description"]


def test_openapi_document_matches_the_url_map(app, client):
    document = client.get("/openapi.json").get_json()
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(API + "/"):
            routes.setdefault(openapi_path(rule.rule), set()).update(m.lower() for m in rule.methods - {"HEAD", "OPTIONS"})
    documented = {path: set(operations) for path, operations in document["paths"].items()}
    assert documented == routes
    assert "/api/v1/bookings/{booking_id}" in documented and documented["/api/v1/cars/{car_id}"] == {"get", "put", "patch", "delete"}


def test_openapi_document_comes_from_the_schemas(client):
    document = client.get("/openapi.json").get_json()
    car = document["components"]["schemas"]["Car"]
    assert set(car["properties"]) == set(dealership.CarSchema().fields)
    assert car["properties"]["id"]["readOnly"] is True
    assert car["properties"]["year"]["maximum"] == datetime.now(timezone.utc).year + 1
    assert car["properties"]["vin"]["pattern"] == dealership.VIN_PATTERN
    assert car["additionalProperties"] is False
    assert "required" not in document["components"]["schemas"]["CarChanges"]
    listing = document["paths"]["/api/v1/cars"]["get"]
    assert {p["name"] for p in listing["parameters"]} == set(dealership.CarQuery().fields)
    assert listing["responses"]["200"]["headers"]["X-Total-Count"]["required"] is True
    booking = document["paths"]["/api/v1/bookings"]["post"]["responses"]
    assert set(booking) == {"201", "400", "401", "403", "404", "409", "413", "415", "422", "429", "503"}
    assert booking["422"]["content"]["application/problem+json"]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert booking["201"]["links"]["get_booking"]["parameters"] == {"booking_id": "$response.body#/id"}


def test_openapi_document_declares_the_api_key_only_when_set(client):
    assert "security" not in client.get("/openapi.json").get_json()["paths"]["/api/v1/cars"]["post"]
    locked = new_app({"DEALERSHIP_API_KEY": "a-key-of-16-chars"}).test_client().get("/openapi.json").get_json()
    assert locked["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert locked["paths"]["/api/v1/cars"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in locked["paths"]["/api/v1/cars"]["get"]


def test_text_patterns_mean_what_the_service_does():
    """The document's patterns spell their classes out, so that they mean the same in any regex dialect:
    checked here against Unicode's own categories, code point by code point."""
    classes = {name: re.compile(f"[{getattr(dealership, name)}]") for name in ("CONTROLS", "SPACES", "FORMATS")}
    classes["FORMATS"] = re.compile(f"[{dealership.FORMATS}{dealership.ASTRAL_FORMATS}]")  # the pattern's and the code's
    for code in range(0x110000):
        c, category = chr(code), unicodedata.category(chr(code))
        assert bool(classes["CONTROLS"].match(c)) == (category == "Cc"), hex(code)
        assert bool(classes["SPACES"].match(c)) == (c.isspace() and category != "Cc"), hex(code)
        # U+13439 to U+1343F are format characters since Unicode 15, unassigned before
        newer = category == "Cn" and 0x13439 <= code <= 0x1343F
        assert bool(classes["FORMATS"].match(c)) == (category == "Cf" or newer), hex(code)


@pytest.mark.parametrize("name", ["\u0085", "\u3000\u2003", "x" * 201, " " + "x" * 201, "Ada\tLovelace", "Ada\nLovelace",
                                  "Ada\x00", "\u200b", "\u202e\u202d", " \ufeff\u200d ", "\ud800", "Ada\udc00"])
def test_text_that_is_not_text_is_422(client, name):
    make_car(client)
    assert_problem(book(client, 1, customer_name=name), 422, "customer_name")
    assert client.get(f"{API}/bookings").get_json() == []


@pytest.mark.parametrize("name, stored", [("  Zoe\u0308 Saldan\u0303a ", "Zo\u00eb Salda\u00f1a"), ("\U0001F697", "\U0001F697"),
                                          ("\u202bשלום\u202c", "\u202bשלום\u202c"), ("x" * 200, "x" * 200)])
def test_text_is_stored_stripped_and_composed(client, name, stored):
    make_car(client)
    response = book(client, 1, customer_name=name)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["customer_name"] == stored


@pytest.mark.parametrize("email", ["a@localhost", "a@[127.0.0.1]", "a@ex\u200bample.com", "a..b@example.com",
                                   "a@example", "not an address", "a@-example.com"])
def test_email_addresses_that_cannot_be_mailed_are_422(client, email):
    make_car(client)
    body = assert_problem(book(client, 1, customer_email=email), 422, "customer_email")
    assert body["errors"]["customer_email"][0].startswith("Not a valid e-mail address")


@pytest.mark.parametrize("email, stored", [("Ada@Example.COM", "Ada@example.com"), ("a@\uff11\uff12.com", "a@12.com"),
                                           ("a@xn--bcher-kva.de", "a@bücher.de"), ("ü@example.com", "ü@example.com")])
def test_email_addresses_are_stored_normalized_and_filtered_that_way(client, email, stored):
    make_car(client)
    response = book(client, 1, customer_email=email)
    assert response.status_code == 201, response.get_json()
    assert response.get_json()["customer_email"] == stored
    assert len(client.get(f"{API}/bookings", query_string={"customer_email": email}).get_json()) == 1
    assert len(client.get(f"{API}/bookings", query_string={"customer_email": stored.upper()}).get_json()) == 1


def test_a_daily_price_is_at_least_a_cent(client):
    assert_problem(client.post(f"{API}/cars", json=car_body(daily_price=5e-324)), 422, "daily_price")
    assert_problem(client.post(f"{API}/cars", json=car_body(daily_price=0.009)), 422, "daily_price")
    assert client.post(f"{API}/cars", json=car_body(daily_price=0.01)).status_code == 201


def test_an_optional_text_may_be_empty_but_not_invisible(client):
    assert client.post(f"{API}/dealers", json={"name": "North", "location": ""}).status_code == 201
    assert_problem(client.post(f"{API}/dealers", json={"name": "North", "location": "\u200b"}), 422, "location")


def operations(document):
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def query_example(op):
    return {p["name"]: p["example"] for p in op["parameters"] if p["in"] == "query"}


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin"])
def test_every_example_in_the_document_is_accepted_by_the_schema_the_route_uses(zone):
    app = new_app({"DEALERSHIP_TIMEZONE": zone})
    document = app.test_client().get("/openapi.json").get_json()
    views = {(openapi_path(rule.rule), method.lower()): app.view_functions[rule.endpoint]
             for rule in app.url_map.iter_rules() if rule.endpoint.startswith("dealership.") for method in rule.methods}
    checked = 0
    with app.test_request_context():
        for path, method, op in operations(document):
            doc = views[path, method].api_doc
            if "requestBody" in op:
                doc["body"].load(op["requestBody"]["content"]["application/json"]["example"])
                checked += 1
            if doc["query"] is not None:
                example = query_example(op)
                assert set(example) == set(doc["query"].fields), path  # every query parameter has one
                doc["query"].load(example)
                checked += 1
    assert checked == 20  # ten bodies, ten query strings


def test_every_field_and_parameter_says_its_rule_in_words(client):
    document = client.get("/openapi.json").get_json()
    for name, schema in document["components"]["schemas"].items():
        for field, prop in schema["properties"].items():
            assert prop.get("description"), (name, field)
    for path, method, op in operations(document):
        assert op["summary"] and not op["summary"].endswith("."), (path, method)
        for parameter in op["parameters"]:
            assert parameter["in"] == "path" or parameter.get("description"), (path, parameter["name"])
    tags = ["cars", "bookings", "maintenance", "holds", "changes", "dealers", "service"]
    assert [tag["name"] for tag in document["tags"]] == tags
    assert [op["tags"][0] for _, _, op in operations(document)] == sorted(
        (op["tags"][0] for _, _, op in operations(document)), key=tags.index)


def test_the_examples_used_in_order_work_and_the_errors_look_like_the_real_ones(client):
    """What a newcomer does on the docs page: create the example car, book it, look for free cars."""
    document = client.get("/openapi.json").get_json()
    ops = {(method, path): op for path, method, op in operations(document)}

    def example(method, path):
        return ops[method, API + path]["requestBody"]["content"]["application/json"]["example"]

    def problem_example(method, path, code):
        return ops[method, API + path]["responses"][code]["content"]["application/problem+json"]["example"]

    client.environ_base["HTTP_X_REQUEST_ID"] = problem_example("get", "/cars/{car_id}", "404")["request_id"]

    car = client.post(f"{API}/cars", json=example("post", "/cars"))
    assert car.status_code == 201
    assert car.get_json() == ops["get", API + "/cars/{car_id}"]["responses"]["200"]["content"]["application/json"]["example"]
    booking = client.post(f"{API}/bookings", json=example("post", "/bookings"))
    assert booking.status_code == 201
    assert booking.get_json() == ops["post", API + "/bookings"]["responses"]["201"]["content"]["application/json"]["example"]
    window = query_example(ops["get", API + "/bookings/available-cars"])
    free = client.get(f"{API}/bookings/available-cars", query_string=window)
    assert free.status_code == 200 and free.get_json() == []  # the example car is booked in the example window
    assert client.get(f"{API}/cars/1/availability",
                      query_string=query_example(ops["get", API + "/cars/{car_id}/availability"])).status_code == 200
    assert client.get(f"{API}/bookings", query_string=query_example(ops["get", API + "/bookings"])).get_json() == [
        booking.get_json()]
    # the error examples quote what the service says
    again = client.post(f"{API}/bookings", json=example("post", "/bookings"))
    assert again.get_json() == problem_example("post", "/bookings", "409")
    bad_vin = client.post(f"{API}/cars", json=example("post", "/cars") | {"vin": "I" * 17})
    assert bad_vin.get_json() == problem_example("post", "/cars", "422")
    assert client.get(f"{API}/cars/7").get_json() == problem_example("get", "/cars/{car_id}", "404")
    assert client.post(f"{API}/cars", data="x", content_type="text/plain").get_json() == problem_example(
        "post", "/cars", "415")
    assert client.post(f"{API}/cars", data="{", content_type="application/json").get_json() == problem_example(
        "post", "/cars", "400")
    # and the changes
    assert client.patch(f"{API}/bookings/1", json=example("patch", "/bookings/{booking_id}")).status_code == 200
    assert client.put(f"{API}/cars/1", json=example("put", "/cars/{car_id}")).status_code == 200
    assert client.post(f"{API}/dealers", json=example("post", "/dealers")).status_code == 201


def test_the_docs_list_operations_in_the_order_a_newcomer_needs_them(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    cars = [(method.upper(), path.removeprefix(API)) for path, ops in paths.items() for method, op in ops.items()
            if op["tags"] == ["cars"]]
    assert cars[:6] == [("POST", "/cars"), ("GET", "/cars"), ("GET", "/cars/{car_id}"), ("PUT", "/cars/{car_id}"),
                        ("PATCH", "/cars/{car_id}"), ("DELETE", "/cars/{car_id}")]
    assert {path for _, path in cars[-2:]} == {"/calendar.ics", "/cars/{car_id}/calendar.ics"}  # the feeds last
    tags = [op["tags"][0] for ops in paths.values() for op in ops.values()]
    assert tags == sorted(tags, key=["cars", "bookings", "maintenance", "holds", "changes", "dealers", "service"].index)


def test_docs_page_is_served_locally(client):
    for url in ("/docs", "/docs/"):
        response = client.get(url)
        assert response.status_code == 200 and response.mimetype == "text/html"
        page = response.get_data(as_text=True)
        assert '"url": "/openapi.json"' in page
        assets = re.findall(r'(?:src|href)="([^"]+)"', page)
        assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"} <= set(assets)
        assert not [a for a in assets if "//" in a]  # nothing from another host
        for asset in assets:
            assert client.get(asset).status_code == 200, asset


def test_embedded_service_mounts_docs_only_when_asked():
    plain = host_app("plain")
    dealership.init_app(plain)
    assert plain.test_client().get("/openapi.json").status_code == 404
    host = host_app("host")
    dealership.init_app(host, url_prefix="/dealership/api/v1", docs_prefix="/dealership")
    client = host.test_client()
    document = client.get("/dealership/openapi.json").get_json()
    assert "/dealership/api/v1/cars" in document["paths"]
    assert "/dealership/openapi.json" in client.get("/dealership/docs").get_data(as_text=True)


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/St_Johns"])
def test_slots_written_directly_match_what_their_schema_writes(zone):
    rng = random.Random(7)
    app = new_app({"DEALERSHIP_TIMEZONE": zone, "DEALERSHIP_CURRENCY": "CHF"})
    client = app.test_client()
    for n in range(20):
        make_car(client, vin=vin(n), daily_price=rng.choice([0.01, 19.99, 33.335, 64.5, 1_000_000, 0.1 * (n + 1)]))
    with app.test_request_context():
        app.preprocess_request()  # the app's zone and currency, as in a request it handles
        cars = list(app.extensions["dealership"].fleet.cars.values())
        base = dealership.micros(datetime(2035, 3, 28, tzinfo=timezone.utc))
        for _ in range(200):
            length = timedelta(minutes=15 * rng.randrange(1, 4 * 24 * 90))
            page = [(base + rng.randrange(0, 10**12), rng.choice(cars)) for _ in range(rng.randrange(0, 5))]
            expected = [dealership.OFFER_SCHEMA.dump({
                "car_id": car.id, "start_datetime": dealership.EPOCH + start * dealership.MICROSECOND,
                "end_datetime": dealership.EPOCH + start * dealership.MICROSECOND + length,
                "total_cents": dealership.price_cents(car.daily_price, dealership.EPOCH + start * dealership.MICROSECOND,
                                                      dealership.EPOCH + start * dealership.MICROSECOND + length)})
                for start, car in page]
            written = dealership.OFFER_SCHEMA.dump_slots(page, length)
            assert [json.loads(part) for part in written] == expected
            assert [list(json.loads(part)) for part in written] == [list(offer) for offer in expected]


# ---------------------------------------------------------------------------------------------
# The planning board and the calendar feeds
# ---------------------------------------------------------------------------------------------


class BoardPage(HTMLParser):
    """What the board shows: each bar (booking or window) with its car's row, the rows' classes, the links."""

    def __init__(self, html):
        super().__init__()
        self.bars, self.rows, self.links, self.tails, self.today, self._row = [], {}, {}, [], 0, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "data-car-id" in attrs:
            self._row = int(attrs["data-car-id"])
            self.rows[self._row] = classes
        if "bar" in classes:
            self.bars.append({"row": self._row, "classes": classes, **attrs})
        if "tail" in classes:
            self.tails.append((self._row, attrs["style"]))
        if "day" in classes and "today" in classes:
            self.today += 1
        if tag == "a":
            self.links[attrs["href"]] = attrs


def board_app():
    """Two dealers, five cars: bookings inside, across and beyond a fixed fortnight, a window, a car in maintenance."""
    app = new_app({"DEALERSHIP_TIMEZONE": "Europe/Berlin"})
    client = app.test_client()
    north = client.post(f"{API}/dealers", json={"name": "North", "turnaround_minutes": 60}).get_json()["id"]
    make_car(client, vin=vin(1), brand="Toyota", model="Corolla")
    make_car(client, vin=vin(2), brand="Skoda", model="Octavia", dealer_id=north)
    make_car(client, vin=vin(3), brand="BMW", model="320i", status="maintenance")
    make_car(client, vin=vin(4), dealer_id=north)
    book(client, 1, "2035-06-05T14:00:00+02:00", "2035-06-07T09:00:00+02:00", customer_name="Secret Name",
         customer_email="secret@example.com")  # Tue 14:00 to Thu 09:00
    book(client, 1, "2035-05-30T09:00:00+02:00", "2035-06-04T12:00:00+02:00", customer_email="early@example.com")
    book(client, 2, "2035-06-15T09:00:00+02:00", "2035-06-20T09:00:00+02:00", customer_email="late@example.com")
    book(client, 4, "2035-07-01T09:00:00+02:00", "2035-07-02T09:00:00+02:00")  # outside the fortnight
    open_window(client, 2, "2035-06-08T08:00:00+02:00", "2035-06-08T12:00:00+02:00", note="Brake check")
    return client


def test_the_board_draws_each_booking_in_its_cars_row_where_its_times_are():
    client = board_app()
    response = client.get("/board?start=2035-06-04")  # a Monday; 14 days by default
    assert response.status_code == 200 and response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    page = BoardPage(html)
    bars = {(bar["row"], bar.get("data-booking-id") or "w" + bar["data-window-id"]): bar for bar in page.bars}
    assert set(bars) == {(1, "1"), (1, "2"), (2, "3"), (2, "w1")}  # booking 4 is outside the period
    tuesday = bars[1, "1"]
    assert (tuesday["data-start"], tuesday["data-end"]) == ("2035-06-05T14:00:00+02:00", "2035-06-07T09:00:00+02:00")
    # placed by its times: Tuesday 14:00 is 1 day 14 hours into 14 days
    assert re.search(r"left:(\d+\.\d+)%;width:(\d+\.\d+)%", tuesday["style"]).groups() == \
        (f"{(24 + 14) / (14 * 24) * 100:.4f}", f"{43 / (14 * 24) * 100:.4f}")
    assert "Booking 1: 2035-06-05 14:00 to 2035-06-07 09:00, 200.00 EUR" == tuesday["title"] == tuesday["aria-label"]
    # cut at the edges and marked as continuing
    assert "cut-start" in bars[1, "2"]["classes"] and "data-continues-before" in bars[1, "2"]
    assert "cut-end" in bars[2, "3"]["classes"] and "data-continues-after" in bars[2, "3"]
    assert "cut-end" not in tuesday["classes"] and "cut-start" not in tuesday["classes"]
    # the window hatched, with its note; the turnaround of North's booking as a tail in its row
    assert "window" in bars[2, "w1"]["classes"] and "Brake check" in bars[2, "w1"]["title"]
    assert [row for row, _ in page.tails] == []  # North's only booking in view runs past the end
    assert page.rows[3] == ["row", "out"] and page.rows[1] == ["row"]  # the car in maintenance is greyed
    for secret in ("Secret Name", "secret@example.com", "early@example.com", "late@example.com", "Ada Lovelace",
                   "ada@example.com"):
        assert secret not in html
    links = page.links
    assert "/board?days=14&start=2035-05-21" in links and "/board?days=14&start=2035-06-18" in links
    assert "/board?days=14" in links and "/docs" in links
    assert "/board?days=14&start=2035-06-04&dealer_id=2" in links


def test_the_board_shows_turnaround_tails_a_dealer_alone_and_marks_today():
    client = board_app()
    book(client, 2, "2035-06-05T09:00:00+02:00", "2035-06-05T12:00:00+02:00")
    page = BoardPage(client.get("/board?start=2035-06-04&days=7&dealer_id=2").get_data(as_text=True))
    assert set(page.rows) == {2, 4}
    assert page.tails == [(2, f"left:{(24 + 12) / (7 * 24) * 100:.4f}%;width:{1 / (7 * 24) * 100:.4f}%")]
    assert page.today == 0
    page = BoardPage(client.get("/board").get_data(as_text=True))  # this week: today is among the days
    assert page.today == 1


@pytest.mark.parametrize("query, name", [
    ("start=2035-6-4", "start"), ("start=2035-02-30", "start"), ("start=tomorrow", "start"), ("start=9999-12-30", "start"),
    ("days=5", "days"), ("days=seven", "days"), ("dealer_id=x", "dealer_id"), ("dealer_id=0", "dealer_id"),
    ("color=red", "color"), ("days=7&days=14", "days"),
])
def test_a_bad_board_query_is_422_problem_json(client, query, name):
    assert_problem(client.get(f"/board?{query}"), 422, name)


def test_the_board_of_an_unknown_dealer_is_404_and_a_host_chooses_where_it_lives():
    assert_problem(new_app().test_client().get("/board?dealer_id=9"), 404)
    host = host_app("host")
    dealership.init_app(host, board_prefix="/staff")
    client = host.test_client()
    assert client.get("/staff/board").status_code == 200
    assert client.get("/board").status_code == 404
    bare = host_app("bare")
    dealership.init_app(bare)
    assert bare.test_client().get("/board").status_code == 404


def feed_events(response):
    calendar = icalendar.Calendar.from_ical(response.get_data())
    return {str(event["UID"]): (str(event["SUMMARY"]), event.decoded("DTSTART"), event.decoded("DTEND"))
            for event in calendar.walk("VEVENT")}


def test_a_cars_feed_has_one_event_per_booking_and_window_and_no_customer():
    client = board_app()
    response = client.get(f"{API}/cars/2/calendar.ics?start_datetime=2035-06-01T00:00:00Z&end_datetime=2035-07-01T00:00:00Z")
    assert response.status_code == 200 and response.mimetype == "text/calendar"
    utc = timezone.utc
    assert feed_events(response) == {
        "booking-3@dealership": ("Booked: Skoda Octavia (booking 3)", datetime(2035, 6, 15, 7, tzinfo=utc),
                                 datetime(2035, 6, 20, 7, tzinfo=utc)),
        "maintenance-window-1@dealership": ("Maintenance: Brake check (Skoda Octavia)", datetime(2035, 6, 8, 6, tzinfo=utc),
                                            datetime(2035, 6, 8, 10, tzinfo=utc))}
    assert b"late@example.com" not in response.get_data() and b"Ada" not in response.get_data()
    assert_problem(client.get(f"{API}/cars/9/calendar.ics"), 404)
    assert_problem(client.get(f"{API}/cars/2/calendar.ics?start_datetime=2035-07-01T00:00:00Z&end_datetime=2035-06-01T00:00:00Z"),
                   422, "end_datetime")


def test_the_fleet_feed_covers_every_car_or_one_dealer_and_by_default_the_next_year():
    client = board_app()
    everything = feed_events(client.get(f"{API}/calendar.ics?start_datetime=2035-05-01T00:00:00Z&end_datetime=2035-08-01T00:00:00Z"))
    assert set(everything) == {"booking-1@dealership", "booking-2@dealership", "booking-3@dealership",
                               "booking-4@dealership", "maintenance-window-1@dealership"}
    north = feed_events(client.get(f"{API}/calendar.ics?dealer_id=2&start_datetime=2035-05-01T00:00:00Z"
                                   "&end_datetime=2035-08-01T00:00:00Z"))
    assert set(north) == {"booking-3@dealership", "booking-4@dealership", "maintenance-window-1@dealership"}
    assert_problem(client.get(f"{API}/calendar.ics?dealer_id=9"), 404)
    # by default from 30 days ago to 365 days ahead: a booking next month is in, one in 2035 is not
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=20)
    book(client, 1, soon.isoformat(), (soon + timedelta(days=1)).isoformat())
    assert set(feed_events(client.get(f"{API}/calendar.ics"))) == {"booking-5@dealership"}


def test_a_feed_answers_304_while_nothing_changed_and_200_after_a_change():
    client = board_app()
    url = f"{API}/cars/1/calendar.ics?start_datetime=2035-06-01T00:00:00Z&end_datetime=2035-07-01T00:00:00Z"
    first = client.get(url)
    etag = first.headers["ETag"]
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b""
    assert client.get(url).get_data() == first.get_data()  # stable: the same bytes while nothing changed
    patch_booking(client, 1, end_datetime="2035-06-07T10:00:00+02:00")
    changed = client.get(url, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert feed_events(changed)["booking-1@dealership"][2] == datetime(2035, 6, 7, 8, tzinfo=timezone.utc)


# ---------------------------------------------------------------------------------------------
# The day coverage behind available-cars, against a brute force and against itself made afresh
# ---------------------------------------------------------------------------------------------


def coverage_state(store):
    """The coverage by car id (positions differ once cars have been deleted)."""
    coverage = store.fleet.coverage
    cars = {position: car_id for car_id, position in coverage.position.items()}

    def ids(mask):
        return {cars[position] for position in coverage.positions(mask)}

    return ({day: ids(mask) for day, mask in coverage.touched.items()},
            {day: ids(mask) for day, mask in coverage.covered.items()}, ids(coverage.long), coverage.longs)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_available_cars_by_day_coverage_match_a_brute_force_through_every_kind_of_change(database, seed):
    rng = random.Random(seed)
    first, second = on_file(database), on_file(database)
    clients = [first.test_client(), second.test_client()]
    base = datetime(2035, 1, 1, tzinfo=timezone.utc)
    entries = {}  # (kind, id) -> (car id, start, end)
    cars, turnaround, status = [], 0, {}

    def moment(hours):
        return base + timedelta(hours=hours)

    made = iter(range(100 * seed, 100 * seed + 100))

    def add_car(client):
        car = make_car(client, vin=vin(next(made)))
        cars.append(car["id"])
        status[car["id"]] = "available"

    for _ in range(6):
        add_car(clients[0])
    for step in range(300):
        client = rng.choice(clients)
        roll = rng.random()
        if roll < 0.45:
            car_id = rng.choice(cars)
            start = moment(rng.randrange(0, 24 * 60))
            length = rng.choice([rng.randrange(1, 30), 24 * rng.randrange(1, 5), 24 * 70])  # hours, days, "long"
            end = start + timedelta(hours=length)
            window_kind = rng.random() < 0.2
            response = open_window(client, car_id, start.isoformat(), end.isoformat()) if window_kind else \
                book(client, car_id, start.isoformat(), end.isoformat())
            pad = timedelta(minutes=turnaround)
            clash = any(c == car_id and s - pad < end and start < e + pad for c, s, e in entries.values())
            if window_kind:
                assert response.status_code == (409 if clash else 201), response.get_json()
            else:
                assert response.status_code == (409 if clash or status[car_id] != "available" else 201)
            if response.status_code == 201:
                entries["window" if window_kind else "booking", response.get_json()["id"]] = (car_id, start, end)
        elif roll < 0.7 and entries:
            kind, entry_id = rng.choice(sorted(entries))
            car_id = entries[kind, entry_id][0]
            path = f"{API}/bookings/{entry_id}" if kind == "booking" else f"{API}/cars/{car_id}/maintenance-windows/{entry_id}"
            assert client.delete(path).status_code == 204
            del entries[kind, entry_id]
        elif roll < 0.78:
            car_id = rng.choice(cars)
            status[car_id] = rng.choice(["available", "maintenance"])
            assert client.patch(f"{API}/cars/{car_id}", json={"status": status[car_id]}).status_code == 200
        elif roll < 0.83:
            turnaround = rng.choice([0, 30, 600])
            set_turnaround(client, turnaround)
        elif roll < 0.88:
            idle = [c for c in cars if not any(e[0] == c for e in entries.values())]
            if idle and len(cars) > 3:
                car_id = rng.choice(idle)
                assert client.delete(f"{API}/cars/{car_id}").status_code == 204
                cars.remove(car_id)
            else:
                add_car(client)
        for asking in clients:
            start = moment(rng.randrange(0, 24 * 60))
            end = start + timedelta(hours=rng.choice([1, 5, 24, 48, 24 * 70]))
            pad = timedelta(minutes=turnaround)
            expected = [c for c in cars if status[c] == "available"
                        and not any(e[0] == c and e[1] - pad < end and start < e[2] + pad for e in entries.values())]
            answer = asking.get(f"{API}/bookings/available-cars", query_string=window(start.isoformat(), end.isoformat()))
            assert [car["id"] for car in answer.get_json()] == expected, step
            assert answer.headers["X-Total-Count"] == str(len(expected))
            paged = asking.get(f"{API}/bookings/available-cars",
                               query_string=window(start.isoformat(), end.isoformat()) | {"limit": 1000})
            assert [car["id"] for car in paged.get_json()] == expected, step
    for app in (first, second):  # what each kept up step by step is what it would make afresh
        store = app.extensions["dealership"]
        kept = coverage_state(store)
        store.fleet.coverage = None
        store.fleet.offerable()
        assert kept == coverage_state(store)


# ---------------------------------------------------------------------------------------------
# serve: several worker processes on one port, and a clean stop
# ---------------------------------------------------------------------------------------------


def test_serve_refuses_several_workers_on_a_memory_store():
    result = new_app({"DEALERSHIP_DATABASE": ":memory:"}).test_cli_runner().invoke(
        args=["serve", "--workers", "2", "--port", "0"])
    assert result.exit_code != 0
    assert "--workers 2 with DEALERSHIP_DATABASE=':memory:'" in result.output and "--workers 1" in result.output


@contextmanager
def serving(tmp_path, *args, settings=None):
    """`flask --app dealership serve` on a free loopback port and a file under tmp_path, with the DEALERSHIP_*
    `settings` given: (process, port)."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")}
    env["DEALERSHIP_DATABASE"] = str(tmp_path / "served.sqlite3")
    env.update(settings or {})
    log = open(tmp_path / "served.log", "w+")
    server = subprocess.Popen([sys.executable, "-m", "flask", "--app", "dealership", "serve", "--port", str(port), *args],
                              cwd=os.path.dirname(os.path.abspath(dealership.__file__)), env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, open(tmp_path / "served.log").read()
                time.sleep(0.1)
        yield server, port
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
        server.wait(timeout=10)
        log.close()


def workers_of(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def test_serve_runs_a_worker_per_core_and_replaces_one_that_dies(tmp_path):
    with serving(tmp_path) as (server, port):
        workers = workers_of(server.pid)
        assert len(workers) == os.cpu_count()
        base = f"http://127.0.0.1:{port}{API}"
        request = urllib.request.Request(f"{base}/cars", json.dumps(car_body()).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        assert json.load(urllib.request.urlopen(request, timeout=10))["id"] == 1
        for _ in range(10):  # new connections, taken by either worker: every one sees the car
            assert [car["id"] for car in json.load(urllib.request.urlopen(f"{base}/cars", timeout=10))] == [1]
        os.kill(workers[0], 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(workers_of(server.pid)) != len(workers)
                                               or workers[0] in workers_of(server.pid)):
            time.sleep(0.1)
        assert len(workers_of(server.pid)) == len(workers) and workers[0] not in workers_of(server.pid)
        for _ in range(10):
            assert urllib.request.urlopen(f"{base}/cars/1", timeout=10).status == 200


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_the_request_in_flight_then_stops(tmp_path, workers):
    with serving(tmp_path, "--workers", workers) as (server, port):
        base = f"http://127.0.0.1:{port}{API}"
        request = urllib.request.Request(f"{base}/cars", json.dumps(car_body()).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        body = json.dumps(booking_body(1)).encode()
        with closing(socket.create_connection(("127.0.0.1", port), timeout=20)) as conn:
            conn.sendall(b"POST /api/v1/bookings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
            time.sleep(0.5)
            server.send_signal(15)  # SIGTERM, in the middle of the request
            time.sleep(1)
            with pytest.raises(OSError):  # no new connection is taken
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            conn.sendall(body[10:])
            answer = conn.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 201"), answer
        assert server.wait(timeout=20) == 0
        log = open(tmp_path / "served.log").read()
        assert "requests in flight finished" in log and "Traceback" not in log
    rows = table_rows(str(tmp_path / "served.sqlite3"))
    assert len(rows["bookings"]) == 1


def test_under_serve_every_line_has_its_time_and_process_and_the_open_warning_comes_once(tmp_path):
    with serving(tmp_path, "--workers", "2") as (server, port):
        workers = workers_of(server.pid)
        deadline = time.monotonic() + 30  # both workers up: each has said where it serves
        while open(tmp_path / "served.log").read().count("Serving on") < 2:
            assert time.monotonic() < deadline, open(tmp_path / "served.log").read()
            time.sleep(0.1)
        request = urllib.request.Request(f"http://127.0.0.1:{port}{API}/cars", json.dumps(car_body()).encode(),
                                         {"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        server.send_signal(15)
        assert server.wait(timeout=30) == 0
    lines = open(tmp_path / "served.log").read().splitlines()
    assert lines and all(LOG_LINE.match(line) for line in lines), lines
    pids = {int(LOG_LINE.match(line)[2]) for line in lines}
    assert pids == {server.pid, *workers}, lines  # the supervisor's lines and each worker's
    assert sum("DEALERSHIP_API_KEY is not set" in line for line in lines) == 1, lines
    assert sum("car 1 created" in line for line in lines) == 1, lines


def test_available_slots_answer_a_page_of_100_unless_asked_for_more(client):
    for n in range(105):
        client.post(f"{API}/cars", json=car_body(vin=vin(n)))
    first = slots(client, duration="PT1H", after="2035-01-20T09:00:00Z")
    assert len(first.get_json()) == 100 and first.headers["X-Total-Count"] == "105"
    assert [s["car_id"] for s in first.get_json()] == list(range(1, 101))
    assert 'rel="next"' in first.headers["Link"] and "offset=100" in first.headers["Link"]
    rest = slots(client, duration="PT1H", after="2035-01-20T09:00:00Z", offset=100)
    assert [s["car_id"] for s in rest.get_json()] == list(range(101, 106))
    assert len(slots(client, duration="PT1H", after="2035-01-20T09:00:00Z", limit=1000).get_json()) == 105


# ---------------------------------------------------------------------------------------------
# Storage safety: the file under a running service, and a damaged write-ahead log at start
# ---------------------------------------------------------------------------------------------


def over_http(method, url, body=None):
    """(status, headers, JSON body) of one request on a connection of its own, whatever its status."""
    request = urllib.request.Request(url, None if body is None else json.dumps(body).encode(),
                                     {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.load(response)
    except urllib.request.HTTPError as error:
        with error:
            return error.code, error.headers, json.load(error)


def in_a_new_thread(action):
    """What `action()` returns when run by a thread that has not served a request yet."""
    results = []
    thread = threading.Thread(target=lambda: results.append(action()))
    thread.start()
    thread.join(timeout=30)
    return results[0]


def test_a_file_replaced_under_two_apps_refuses_every_write_and_keeps_nothing(sqlite_file, tmp_path):
    first, second = on_file(sqlite_file).test_client(), on_file(sqlite_file).test_client()
    make_car(first)
    assert book(first, 1).status_code == 201
    before = state(first)
    assert state(second) == before
    other = str(tmp_path / "other.sqlite3")
    on_file(other)  # another database of the service: its seed dealer, no car
    gc.collect()  # closed: one self-contained file
    for suffix in ("-wal", "-shm"):  # replaced as a restore would: the old file's log goes with it
        os.remove(sqlite_file + suffix)
    os.replace(other, sqlite_file)
    replacement = table_rows(sqlite_file)
    for client in (first, second):
        refused = book(client, 1, "2035-02-01T10:00:00Z", "2035-02-01T11:00:00Z")
        assert sqlite_file in assert_problem(refused, 503)["detail"]
        assert refused.headers["Retry-After"] == "60"
        assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2))), 503)
        health = client.get("/health")
        assert "no longer the one the service opened" in assert_problem(health, 503)["detail"]
        assert state(client) == before
        assert in_a_new_thread(lambda client=client: state(client)) == before
    assert table_rows(sqlite_file) == replacement


def test_a_file_moved_away_refuses_writes_until_it_is_back(sqlite_file, tmp_path):
    client = on_file(sqlite_file).test_client()
    make_car(client)
    before, aside = state(client), str(tmp_path / "aside.sqlite3")
    os.rename(sqlite_file, aside)
    assert sqlite_file in assert_problem(book(client, 1), 503)["detail"]
    assert_problem(client.get("/health"), 503)
    assert state(client) == before and not os.path.exists(sqlite_file)
    os.rename(aside, sqlite_file)
    assert book(client, 1).status_code == 201
    assert client.get("/health").status_code == 200
    assert len(table_rows(sqlite_file)["bookings"]) == 1


def test_under_serve_a_deleted_file_refuses_writes_on_every_worker_and_is_not_made_again(tmp_path):
    path = str(tmp_path / "served.sqlite3")
    with serving(tmp_path, "--workers", "2") as (server, port):
        base = f"http://127.0.0.1:{port}"
        assert over_http("POST", f"{base}{API}/cars", car_body())[0] == 201
        for day in range(1, 6):
            body = booking_body(1, f"2035-03-0{day}T10:00:00Z", f"2035-03-0{day}T12:00:00Z")
            assert over_http("POST", f"{base}{API}/bookings", body)[0] == 201
        bookings = over_http("GET", f"{base}{API}/bookings")[2]
        assert len(bookings) == 5
        for suffix in ("", "-wal", "-shm"):
            os.remove(path + suffix)
        for n in range(20):  # each on a new connection, taken by either worker
            body = booking_body(1, f"2035-04-{n + 1:02d}T10:00:00Z", f"2035-04-{n + 1:02d}T12:00:00Z")
            status, headers, problem = over_http("POST", f"{base}{API}/bookings", body)
            assert status == 503 and path in problem["detail"] and headers["Retry-After"] == "60", problem
        for _ in range(10):
            status, _, problem = over_http("GET", f"{base}/health")
            assert status == 503 and path in problem["detail"], problem
        for _ in range(10):
            status, headers, found = over_http("GET", f"{base}{API}/bookings")
            assert (status, headers["X-Total-Count"], found) == (200, "5", bookings)
        assert not any(os.path.exists(path + suffix) for suffix in ("", "-wal", "-shm"))
    assert "Traceback" not in open(tmp_path / "served.log").read()


def test_a_worker_of_serve_never_makes_the_file_it_should_find(sqlite_file, monkeypatch):
    monkeypatch.setenv(dealership.SERVE_WORKER, "1")
    with pytest.raises(dealership.ConfigError, match="does not exist.*deleted or moved") as refused:
        on_file(sqlite_file)
    assert sqlite_file in str(refused.value) and not os.path.exists(sqlite_file)


def copy_file(source, target):
    with open(source, "rb") as original, open(target, "wb") as copy:
        copy.write(original.read())


def crashed_copy(tmp_path, bookings=40):
    """A database as kill -9 leaves it: the file, its -wal and its -shm, copied while the app that
    wrote them is alive, the log never checkpointed (a car, then `bookings` bookings, one commit
    each). Returns the copy's path and what the app served."""
    path, copy = str(tmp_path / "written.sqlite3"), str(tmp_path / "crashed.sqlite3")
    app = on_file(path, DEALERSHIP_SYNCHRONOUS="normal")
    app.extensions["dealership"].engine._writer.conn.execute("PRAGMA wal_autocheckpoint = 0")
    client = app.test_client()
    make_car(client)
    for n in range(bookings):
        start = datetime(2035, 5, 1, tzinfo=timezone.utc) + timedelta(hours=2 * n)
        assert book(client, 1, start.isoformat(), (start + timedelta(hours=1)).isoformat()).status_code == 201
    for suffix in ("", "-wal", "-shm"):
        copy_file(path + suffix, copy + suffix)
    return copy, state(client)


def wal_frames(path):
    """(frame size, [whether each frame of the log ends a commit]), read from the frame headers."""
    with open(f"{path}-wal", "rb") as wal:
        log = wal.read()
    frame_size = 24 + int.from_bytes(log[8:12], "big")
    return frame_size, [log[32 + n * frame_size + 4:32 + n * frame_size + 8] != bytes(4)
                        for n in range((len(log) - 32) // frame_size)]


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def files_of(path):
    found = {}
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                found[suffix] = f.read()
    return found


def test_wal_checksums_read_words_in_either_byte_order():
    def by_hand(data, big_endian, s1, s2):
        words = [int.from_bytes(data[i:i + 4], "big" if big_endian else "little") for i in range(0, len(data), 4)]
        for i in range(0, len(words), 2):
            s1 = (s1 + words[i] + s2) % 2 ** 32
            s2 = (s2 + words[i + 1] + s1) % 2 ** 32
        return s1, s2

    rng = random.Random(7)
    for _ in range(200):
        data, seed = rng.randbytes(8 * rng.randrange(1, 600)), (rng.randrange(2 ** 32), rng.randrange(2 ** 32))
        for big_endian in (False, True):
            assert dealership.wal_checksum(data, big_endian, *seed) == by_hand(data, big_endian, *seed)


def torn_tail(kind):
    """A change to a crashed log that only adds what a crash mid-commit leaves after the last commit."""
    def change(path):
        frame_size, _ = wal_frames(path)
        with open(f"{path}-wal", "r+b") as wal:
            wal.seek(-frame_size, os.SEEK_END)
            last = bytearray(wal.read())
            last[4:8] = bytes(4)  # a frame of a transaction that never reached its commit
            wal.seek(0, os.SEEK_END)
            wal.write({"a few bytes": b"\x17" * 9, "half a frame": last[:frame_size // 2],
                       "a frame that ends no commit": last}[kind])
    return change


@pytest.mark.parametrize("tail", [None, "a few bytes", "half a frame", "a frame that ends no commit"])
def test_a_crash_starts_with_every_committed_booking_whatever_its_torn_tail(tmp_path, tail, caplog):
    copy, served = crashed_copy(tmp_path)
    if tail:
        torn_tail(tail)(copy)
    with caplog.at_level("WARNING", logger="dealership"):
        client = on_file(copy).test_client()
    assert state(client) == served and len(served["bookings"]) == 40
    assert "write-ahead log" not in caplog.text


def damage(kind, path):
    """Damage the crashed log at `path` as `kind` says; return the first frame SQLite would drop
    for it (numbered from 1), or None for one that damages the header."""
    frame_size, commits = wal_frames(path)
    middle, last = len(commits) // 2, len(commits)
    if kind == "a byte of the header":
        flip_byte(f"{path}-wal", 20)
        return None
    if kind == "a byte mid-log":
        flip_byte(f"{path}-wal", 32 + (middle - 1) * frame_size + 24 + 1000)
        return middle
    if kind == "a byte of the last commit":
        flip_byte(f"{path}-wal", 32 + (last - 1) * frame_size + 24 + 1000)
        return last
    if kind == "cut in half":
        with open(f"{path}-wal", "r+b") as wal:
            wal.truncate(os.path.getsize(f"{path}-wal") // 2)
        return (os.path.getsize(f"{path}-wal") - 32) // frame_size + 1
    os.remove(path)  # the database file gone, its log left
    return 1


@pytest.mark.parametrize("kind, says", [
    ("a byte of the header", r"its header is damaged, so every frame would be dropped: (\d+) committed transactions"),
    ("a byte mid-log", r"frame \d+ of \d+ is damaged: (\d+) committed transactions would be dropped"),
    ("a byte of the last commit", r"frame (\d+) of \1 is damaged: 1 committed transaction would be dropped"),
    ("cut in half", r"the file is cut short \(\d+ whole frames, where the wal-index says committed frames reach "
                    r"frame \d+\): at least \d+ committed transactions? would be dropped"),
    ("the database file deleted", r"the database file is missing or empty, so the whole log would be dropped: "
                                  r"(\d+) committed transactions"),
])
def test_a_damaged_wal_refuses_to_start_saying_what_would_be_dropped(tmp_path, kind, says):
    copy, _ = crashed_copy(tmp_path)
    frame_size, commits = wal_frames(copy)
    first_dropped = damage(kind, copy)
    before = files_of(copy)
    with pytest.raises(dealership.ConfigError) as refused:
        on_file(copy)
    message = str(refused.value)
    found = re.search(says, message)
    assert found, message
    if kind in ("a byte of the header", "a byte mid-log", "the database file deleted"):
        assert int(found[1]) == sum(commits[(first_dropped or 1) - 1:])  # every commit from there on
    assert f"write-ahead log '{copy}-wal'" in message and "left as it is" in message
    assert "DEALERSHIP_ACCEPT_WAL_LOSS=1" in message and "\n" not in message
    assert files_of(copy) == before  # nothing opened, nothing recovered, nothing made


def test_accepting_the_loss_starts_without_it_says_so_once_and_then_starts_clean(tmp_path, caplog):
    copy, served = crashed_copy(tmp_path)
    _, commits = wal_frames(copy)
    first_dropped = damage("a byte mid-log", copy)
    dropped = sum(commits[first_dropped - 1:])
    with caplog.at_level("WARNING", logger="dealership"):
        app = on_file(copy, DEALERSHIP_ACCEPT_WAL_LOSS="1")
    warnings = [r for r in caplog.records if "DEALERSHIP_ACCEPT_WAL_LOSS" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert f"{dropped} committed transactions would be dropped" in warnings[0].getMessage()
    client = app.test_client()
    assert state(client)["bookings"] == served["bookings"][:40 - dropped]  # one commit per booking, in order
    assert book(client, 1, "2035-09-01T10:00:00Z", "2035-09-01T11:00:00Z").status_code == 201
    again = str(tmp_path / "again.sqlite3")  # a crash now: what the log holds is intact
    for suffix in ("", "-wal", "-shm"):
        copy_file(copy + suffix, again + suffix)
    assert state(on_file(again).test_client()) == state(client)


def test_serve_refuses_a_damaged_wal_in_one_line_and_leaves_it_as_it_is(tmp_path):
    copy, _ = crashed_copy(tmp_path)
    damage("a byte mid-log", copy)
    before = files_of(copy)
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {"DEALERSHIP_DATABASE": copy}
    done = subprocess.run([sys.executable, "-m", "flask", "--app", "dealership", "serve", "--port", str(port)],
                          cwd=os.path.dirname(os.path.abspath(dealership.__file__)), env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert LOG_LINE.match(last) and " ERROR " in last
    assert f"dealership: DEALERSHIP_DATABASE='{copy}': SQLite would drop committed transactions" in last
    assert "is damaged" in last and "DEALERSHIP_ACCEPT_WAL_LOSS=1" in last
    assert "Traceback" not in done.stderr
    assert files_of(copy) == before


# Bounds on the feeds and the board: the longest period, the most events or rows, 304 before
# building, and the rate limit
# ---------------------------------------------------------------------------------------------


FEED_URL = f"{API}/calendar.ics"


def feed_query(start, end):
    return f"start_datetime={start}&end_datetime={end}"


def test_a_feed_period_longer_than_the_largest_is_422_on_end_datetime_and_names_the_largest():
    client = board_app()
    longest = feed_query("2035-01-01T00:00:00Z", "2036-02-05T00:00:00Z")  # 400 days: 2036 is a leap year
    assert client.get(f"{FEED_URL}?{longest}").status_code == 200
    assert client.get(f"{API}/cars/1/calendar.ics?{longest}").status_code == 200
    far_back = (datetime.now(timezone.utc) - timedelta(days=1000)).replace(microsecond=0).isoformat()
    for asked in (feed_query("2035-01-01T00:00:00Z", "2036-02-05T00:00:01Z"),
                  feed_query("2035-01-01T00:00:00Z", "9998-12-31T00:00:00Z"),
                  "end_datetime=2040-01-01T00:00:00Z",  # from 30 days ago, by default
                  f"start_datetime={far_back.replace('+', '%2B')}"):  # to 365 days ahead, by default
        for url in (FEED_URL, f"{API}/cars/1/calendar.ics", f"{FEED_URL}?dealer_id=2"):
            url += ("&" if "?" in url else "?") + asked
            body = assert_problem(client.get(url), 422, "end_datetime")
            assert "400 days" in body["errors"]["end_datetime"][0], body
    # a start given alone that falls after the default end is a period that ends before it starts
    body = assert_problem(client.get(f"{FEED_URL}?start_datetime=2040-01-01T00:00:00Z"), 422, "end_datetime")
    assert body["errors"]["end_datetime"] == ["Must be after start_datetime."]


def test_a_feed_with_more_events_than_the_bound_is_422_counted_before_the_calendar_is_made(monkeypatch):
    client = board_app()  # five entries from May to July 2035: four bookings and a window
    monkeypatch.setattr(dealership, "MAX_FEED_EVENTS", 3)
    monkeypatch.setattr(dealership, "ical", lambda *args: pytest.fail("the calendar was made"))
    summer = feed_query("2035-05-01T00:00:00Z", "2035-08-01T00:00:00Z")
    body = assert_problem(client.get(f"{FEED_URL}?{summer}"), 422, "end_datetime")
    message = body["errors"]["end_datetime"][0]
    assert "5 bookings and maintenance windows" in message and "more than the 3" in message
    assert "shorter period" in message and "one dealer" in message
    monkeypatch.undo()
    monkeypatch.setattr(dealership, "MAX_FEED_EVENTS", 3)
    assert set(feed_events(client.get(f"{FEED_URL}?dealer_id=2&{summer}"))) == {
        "booking-3@dealership", "booking-4@dealership", "maintenance-window-1@dealership"}  # three: within it
    book(client, 1, "2035-07-10T09:00:00Z", "2035-07-11T09:00:00Z")
    book(client, 1, "2035-07-20T09:00:00Z", "2035-07-21T09:00:00Z")  # car 1 then has four
    body = assert_problem(client.get(f"{API}/cars/1/calendar.ics?{summer}"), 422, "end_datetime")
    assert "4 bookings" in body["errors"]["end_datetime"][0] and "one dealer" not in body["errors"]["end_datetime"][0]
    june = feed_query("2035-06-01T00:00:00Z", "2035-07-01T00:00:00Z")
    assert set(feed_events(client.get(f"{API}/cars/1/calendar.ics?{june}"))) == {"booking-1@dealership",
                                                                                   "booking-2@dealership"}


def test_a_feed_answers_304_before_building_anything(monkeypatch):
    client = board_app()
    url = f"{FEED_URL}?{feed_query('2035-06-01T00:00:00Z', '2035-07-01T00:00:00Z')}"
    first = client.get(url)
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-cache"
    etag = first.headers["ETag"]
    monkeypatch.setattr(dealership.Fleet, "entries", lambda *args, **kwargs: pytest.fail("the entries were looked up"))
    monkeypatch.setattr(dealership, "ical", lambda *args: pytest.fail("the calendar was made"))
    for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        again = client.get(url, headers={"If-None-Match": sent})
        assert again.status_code == 304 and again.get_data() == b"" and again.headers["ETag"] == etag, sent
    monkeypatch.undo()
    other = client.get(f"{FEED_URL}?{feed_query('2035-06-01T00:00:00Z', '2035-07-02T00:00:00Z')}",
                       headers={"If-None-Match": etag})  # another period: another feed
    assert other.status_code == 200 and other.headers["ETag"] != etag


def test_a_feeds_etag_changes_when_a_booking_is_made_or_cancelled_and_differs_between_stores():
    client = board_app()
    url = f"{API}/cars/4/calendar.ics?{feed_query('2035-06-01T00:00:00Z', '2035-08-01T00:00:00Z')}"
    before = client.get(url).headers["ETag"]
    made = book(client, 4, "2035-07-10T09:00:00Z", "2035-07-11T09:00:00Z").get_json()["id"]
    after_booking = client.get(url, headers={"If-None-Match": before})
    assert after_booking.status_code == 200 and after_booking.headers["ETag"] != before
    assert f"booking-{made}@dealership" in feed_events(after_booking)
    assert client.get(url, headers={"If-None-Match": after_booking.headers["ETag"]}).status_code == 304
    assert client.delete(f"{API}/bookings/{made}").status_code == 204
    after_cancel = client.get(url, headers={"If-None-Match": after_booking.headers["ETag"]})
    assert after_cancel.status_code == 200 and f"booking-{made}@dealership" not in feed_events(after_cancel)
    assert after_cancel.headers["ETag"] not in (before, after_booking.headers["ETag"])
    # the same records in another store (another process, or the same one reloaded) have another tag:
    # a tag never vouches for a fleet it did not come from
    twin = board_app()
    assert twin.get(url).get_data() == client.get(url).get_data()
    assert twin.get(url, headers={"If-None-Match": after_cancel.headers["ETag"]}).status_code == 200


def test_the_board_shows_a_page_of_cars_at_a_time_with_links_between_pages(monkeypatch):
    client = board_app()  # the first dealer's cars 1 and 3, then North's 2 and 4
    monkeypatch.setattr(dealership, "BOARD_ROWS", 2)
    first = BoardPage(client.get("/board?start=2035-06-04").get_data(as_text=True))
    assert list(first.rows) == [1, 3]
    assert "/board?days=14&start=2035-06-04&page=2" in first.links
    second_html = client.get("/board?start=2035-06-04&page=2").get_data(as_text=True)
    second = BoardPage(second_html)
    assert list(second.rows) == [2, 4] and {bar["row"] for bar in second.bars} == {2}
    assert "/board?days=14&start=2035-06-04" in second.links and "page=1" not in second_html  # back to page 1
    assert "/board?days=14&start=2035-06-18&page=2" in second.links  # the next days keep the page of cars
    assert "page 2 of 2" in second_html
    body = assert_problem(client.get("/board?start=2035-06-04&page=3"), 404)
    assert "2 pages" in body["detail"]
    assert list(BoardPage(client.get("/board?start=2035-06-04&dealer_id=2").get_data(as_text=True)).rows) == [2, 4]
    dealer = client.post(f"{API}/dealers", json={"name": "Empty"}).get_json()["id"]  # its heading takes a row
    third = client.get("/board?start=2035-06-04&page=3").get_data(as_text=True)
    assert f'data-dealer-id="{dealer}"' in third and not BoardPage(third).rows
    for bad in ("page=0", "page=x", "page=1&page=2"):
        assert_problem(client.get(f"/board?{bad}"), 422, "page")


def test_a_board_page_with_more_bars_than_the_bound_is_422_before_any_is_drawn(monkeypatch):
    client = board_app()  # four bars in the fortnight: three in North's rows
    monkeypatch.setattr(dealership, "BOARD_MAX_BARS", 3)
    monkeypatch.setattr(dealership, "bar_html", lambda *args: pytest.fail("a bar was drawn"))
    body = assert_problem(client.get("/board?start=2035-06-04"), 422, "days")
    assert "4 bookings and maintenance windows" in body["errors"]["days"][0]
    assert "fewer days, or one dealer" in body["errors"]["days"][0]
    monkeypatch.undo()
    monkeypatch.setattr(dealership, "BOARD_MAX_BARS", 3)
    assert len(BoardPage(client.get("/board?start=2035-06-04&dealer_id=2").get_data(as_text=True)).bars) == 2
    assert len(BoardPage(client.get("/board?start=2035-06-04&days=7").get_data(as_text=True)).bars) == 3


def test_the_board_answers_304_before_drawing_and_changes_its_etag_with_a_booking(monkeypatch):
    client = board_app()
    first = client.get("/board?start=2035-06-04")
    etag = first.headers["ETag"]
    assert first.status_code == 200 and first.headers["Cache-Control"] == "no-cache"
    monkeypatch.setattr(dealership, "board_page", lambda *args: pytest.fail("the board was made"))
    again = client.get("/board?start=2035-06-04", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.get_data() == b""
    monkeypatch.undo()
    assert client.get("/board?start=2035-06-04&days=7", headers={"If-None-Match": etag}).status_code == 200
    book(client, 4, "2035-06-10T09:00:00Z", "2035-06-11T09:00:00Z")
    changed = client.get("/board?start=2035-06-04", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["ETag"] != etag
    assert len(BoardPage(changed.get_data(as_text=True)).bars) == 5


@pytest.mark.parametrize("path", ["/board", f"{API}/calendar.ics", f"{API}/cars/1/calendar.ics"])
def test_the_board_and_the_feeds_are_under_the_general_rate_limit_and_the_docs_are_not(path):
    limited = new_app({"DEALERSHIP_RATE_LIMIT": "3/minute"}).test_client()
    make_car(limited)  # a write of the API: counted on its own route
    assert [limited.get(path).status_code for _ in range(3)] == [200, 200, 200]
    body = assert_problem(limited.get(path), 429)
    assert "Too many requests" in body["detail"]
    assert [limited.get(docs).status_code for docs in ["/docs", "/openapi.json"] * 3] == [200] * 6
    elsewhere = limited.get(path, environ_base={"REMOTE_ADDR": "192.0.2.9"})  # per client address
    assert elsewhere.status_code == 200


# ---------------------------------------------------------------------------------------------
# serve: a client that does not read its response costs a bounded buffer, never disk or a thread
# for good
# ---------------------------------------------------------------------------------------------


def seed_cars(path, count):
    """`count` cars in the database file `path`, written in one transaction: a large GET /cars."""
    engine = on_file(path).extensions["dealership"].engine
    with engine.writer() as writer, writer.transaction(write=True) as db:
        for n in range(count):
            body = car_body(vin=vin(n), model=f"Camry {'x' * 80} {n}", color="y" * 50)
            db.insert("car", dealership.CAR_SCHEMA.load(body))


def unread(port, path, count):
    """`count` connections, each with a tiny receive window, that ask for `path` and never read."""
    connections = []
    for _ in range(count):
        conn = socket.socket()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: it sets the window
        conn.settimeout(10)
        connections.append(conn)
        conn.connect(("127.0.0.1", port))
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return connections


def spooled(pid, folder):
    """The files under `folder` that process `pid` holds open (a spooled buffer is unlinked at once)."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found + os.listdir(folder)


def test_a_client_that_never_reads_makes_serve_spool_nothing_and_others_are_still_answered(tmp_path, monkeypatch):
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setenv("TMPDIR", str(spool))  # where waitress would spool a buffer past outbuf_overflow
    seed_cars(str(tmp_path / "served.sqlite3"), 12000)
    with serving(tmp_path, "--workers", "1", "--threads", "8") as (server, port):
        size = len(urllib.request.urlopen(f"http://127.0.0.1:{port}{API}/cars", timeout=30).read())
        assert size > 3 * dealership.SERVE_BUFFER  # far more than a connection may buffer
        connections = unread(port, f"{API}/cars", 6)  # fewer than the threads: see the next test for more
        try:
            deadline = time.monotonic() + 4  # time enough to write every response out, or to spool it
            while time.monotonic() < deadline:
                assert spooled(server.pid, spool) == []
                time.sleep(0.2)
            health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
            assert json.load(health) == {"status": "ok", "database": "ok"}
        finally:
            for conn in connections:
                conn.close()
        assert spooled(server.pid, spool) == []


def test_connections_that_stop_reading_are_closed_after_the_idle_time_and_free_their_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(dealership, "SERVE_IDLE_SECONDS", 1)
    path = str(tmp_path / "served.sqlite3")
    seed_cars(path, 12000)
    app = on_file(path)
    size = len(app.test_client().get(f"{API}/cars").get_data())
    listener = socket.create_server(("127.0.0.1", 0))
    # small kernel buffers, inherited by each connection: the response waits in waitress, not in them
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    server = dealership.WaitressServer(app, listener, threads=2)
    stop = threading.Event()

    def serve():
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline:
            server.poll(timeout=0.1)

    polling = threading.Thread(target=serve)
    polling.start()
    connections = []
    try:
        port = listener.getsockname()[1]
        connections = unread(port, f"{API}/cars", 3)  # more than the threads: each one waits on a client
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30)  # answered once they are closed
        assert json.load(health) == {"status": "ok", "database": "ok"}
        time.sleep(4 * dealership.SERVE_IDLE_SECONDS)  # the third one, served last, closed as well
        for conn in connections:  # each was closed before its response was all sent
            received = 0
            for _ in range(100_000):
                try:
                    data = conn.recv(65536)
                except ConnectionError:
                    break
                if not data:
                    break
                received += len(data)
            assert 0 < received < size
    finally:
        for conn in connections:
            conn.close()
        stop.set()
        polling.join(timeout=10)
        server.finish_in_flight(1)
        listener.close()


def test_apps_on_one_file_give_a_feed_the_same_etag_and_both_move_on_a_change(sqlite_file):
    """serve's workers are processes on one file: a calendar that polls gets its 304 whichever answers."""
    first, second = on_file(sqlite_file).test_client(), on_file(sqlite_file).test_client()
    make_car(first)
    tags = [client.get(f"{API}/calendar.ics").headers["ETag"] for client in (first, second)]
    assert tags[0] == tags[1]
    assert second.get(f"{API}/calendar.ics", headers={"If-None-Match": tags[0]}).status_code == 304
    assert book(first, 1).status_code == 201
    moved = second.get(f"{API}/calendar.ics", headers={"If-None-Match": tags[0]})
    assert moved.status_code == 200 and moved.headers["ETag"] != tags[0]
    assert first.get(f"{API}/calendar.ics").headers["ETag"] == moved.headers["ETag"]


# Under serve as under the test client: clients behind proxies, workers that cannot start, the
# edges of bookings, text, time and error bodies
# ---------------------------------------------------------------------------------------------


def http(port, method, path, body=None, headers=None):
    """One request to a served app: (status, JSON body or None)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data, method=method,
                                     headers={"Content-Type": "application/json"} | (headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_under_serve_behind_a_proxy_one_clients_refused_keys_do_not_block_anothers_key(tmp_path):
    key = "s3cret-key-for-tests"
    settings = {"DEALERSHIP_PROXIES": "1", "DEALERSHIP_API_KEY": key, "DEALERSHIP_REFUSED_KEY_LIMIT": "3/minute"}
    a, b = {"X-Forwarded-For": "203.0.113.5"}, {"X-Forwarded-For": "198.51.100.7"}
    wrong, right = {"Authorization": "Bearer guess-guess-guess"}, {"Authorization": f"Bearer {key}"}
    with serving(tmp_path, "--workers", "1", settings=settings) as (server, port):
        statuses = []
        while 429 not in statuses and len(statuses) < 10:
            statuses.append(http(port, "POST", f"{API}/dealers", {"name": "A"}, a | wrong)[0])
        assert statuses == [401, 401, 401, 429]
        assert http(port, "POST", f"{API}/dealers", {"name": "B"}, b | wrong)[0] == 401  # B counts apart from A
        assert http(port, "POST", f"{API}/dealers", {"name": "B"}, b | right) == (201, {
            "id": 2, "name": "B", "location": "", "turnaround_minutes": 0})
        assert http(port, "POST", f"{API}/dealers", {"name": "A"}, a | right)[0] == 201  # the key is never held up
        assert http(port, "POST", f"{API}/dealers", {"name": "A"}, a | wrong)[0] == 429
        assert [dealer["name"] for dealer in http(port, "GET", f"{API}/dealers")[1]] == [
            "Oscar Mobility Main", "B", "A"]
        server.send_signal(15)  # a clean stop: every line written
        assert server.wait(timeout=30) == 0
    log = open(tmp_path / "served.log").read()
    assert "refused API key from 203.0.113.5" in log and "refused API key from 198.51.100.7" in log
    assert "refused API key from 127.0.0.1" not in log


def test_the_right_key_is_never_throttled_by_refusals_from_its_address(locked):
    wrong, right = {"Authorization": "Bearer guess-guess-guess"}, {"Authorization": "Bearer s3cret-key-for-tests"}
    for _ in range(10):
        assert_problem(locked.post(f"{API}/dealers", json={"name": "X"}, headers=wrong), 401)
    assert_problem(locked.post(f"{API}/dealers", json={"name": "X"}, headers=wrong), 429)
    assert locked.post(f"{API}/dealers", json={"name": "Y"}, headers=right).status_code == 201
    assert [dealer["name"] for dealer in locked.get(f"{API}/dealers").get_json()] == ["Oscar Mobility Main", "Y"]


def test_workers_that_cannot_start_are_restarted_after_growing_pauses_then_serve_stops_saying_why(tmp_path):
    with serving(tmp_path, "--workers", "2") as (server, port):
        deadline = time.monotonic() + 30  # both workers up, each on the database file
        while open(tmp_path / "served.log").read().count("Serving on") < 2:
            assert time.monotonic() < deadline, open(tmp_path / "served.log").read()
            time.sleep(0.1)
        garbage = tmp_path / "garbage"
        garbage.write_bytes(b"not a database at all " * 100)
        os.replace(garbage, tmp_path / "served.sqlite3")  # what any new worker opens; the supervisor has its own
        for name in ("served.sqlite3-wal", "served.sqlite3-shm"):  # else the log's copy of the header is read
            os.unlink(tmp_path / name)
        for worker in workers_of(server.pid):
            os.kill(worker, 9)
        assert server.wait(timeout=60) == dealership.FAILED_START_EXIT
    log = open(tmp_path / "served.log").read()
    gave_up = re.search(r"workers cannot start: slot (\d) failed 5 starts in a row, each exiting within 10 s", log)
    assert gave_up, log
    failures = re.findall(r"failed start (\d) of 5 in a row in slot (\d); starting another in ([\d.]+) s", log)
    slot = [(int(n), float(pause)) for n, number, pause in failures if number == gave_up[1]]
    assert [n for n, _ in slot] == [1, 2, 3, 4], log  # then the fifth failed start, and no sixth
    pauses = [pause for _, pause in slot]
    assert pauses == sorted(set(pauses)), log  # each pause longer than the one before
    assert len(failures) <= 2 * 4, log
    assert "is not a SQLite database" in log  # each worker's own reason
    assert "stopped: 2 workers" in log


def test_a_booking_that_has_ended_cannot_be_changed_but_may_be_cancelled(database):
    client = on_file(database).test_client()
    make_car(client, vin=vin(1))
    make_car(client, vin=vin(2))
    ended = datetime.now(timezone.utc) - timedelta(hours=1)
    insert_booking(database, 1, ended - timedelta(days=2), ended)  # booked and over: two days until an hour ago
    past = on_file(database).test_client()
    before, rows = past.get(f"{API}/bookings/1").get_json(), table_rows(database)
    for changes in ({"car_id": 2}, {"end_datetime": from_now(days=30)}, {"customer_name": "Ada King"},
                    {"start_datetime": from_now(days=1), "end_datetime": from_now(days=2)}):
        refused = assert_problem(patch_booking(past, 1, **changes), 409)
        assert refused["detail"] == (f"Booking 1 ended at {ended.isoformat()}: a booking that has ended can no "
                                     "longer be changed.")
    assert past.get(f"{API}/bookings/1").get_json() == before
    assert table_rows(database) == rows
    assert past.delete(f"{API}/bookings/1").status_code == 204  # a record may still be removed
    assert past.get(f"{API}/bookings").get_json() == []


@pytest.mark.parametrize("name", ["\U000E0001", "\U000E0001\U000E0041\U000E007F", " \U0001D173\u200b ", "\U0001BCA0",
                                  "\U000110BD"])
def test_a_name_of_invisible_format_characters_above_u_ffff_is_422(client, name):
    make_car(client)
    assert_problem(book(client, 1, customer_name=name), 422, "customer_name")
    assert client.get(f"{API}/bookings").get_json() == []


def test_a_flag_written_with_tag_characters_is_a_visible_name_and_the_document_agrees(client):
    make_car(client)
    flag = "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"  # Scotland's
    response = book(client, 1, customer_name=flag)
    assert response.status_code == 201 and response.get_json()["customer_name"] == flag
    pattern = client.get("/openapi.json").get_json()["components"]["schemas"]["Booking"]["properties"][
        "customer_name"]["pattern"]
    assert re.search(pattern, flag)  # (a lone tag character is refused in code: see ASTRAL_FORMATS)


@pytest.mark.parametrize("zone, start, written", [
    ("Europe/Berlin", "1800-01-01T00:00:00Z", "1800-01-01T00:53:00+00:53"),  # local mean time: +00:53:28
    ("America/Chicago", "1800-01-01T12:00:00Z", "1800-01-01T06:09:00-05:51"),  # -05:50:36
    ("America/Chicago", "0001-01-01T05:51:00Z", "0001-01-01T00:00:00-05:51")])
def test_an_instant_from_before_standard_time_is_written_with_whole_minutes_and_reads_back(zone, start, written):
    # the only dates before 2035 here: no zone's offset has had seconds since 1972
    client = new_app({"DEALERSHIP_TIMEZONE": zone}).test_client()
    make_car(client)
    quote = client.get(f"{API}/cars/1/quote", query_string=window(start, "2035-01-15T10:00:00Z")).get_json()
    assert quote["start_datetime"] == written
    again = client.get(f"{API}/cars/1/quote", query_string=window(written, "2035-01-15T10:00:00Z")).get_json()
    assert again == quote
    assert datetime.fromisoformat(written) == datetime.fromisoformat(start)


def test_an_instant_that_cannot_be_written_in_the_zone_is_422_not_500():
    client = new_app({"DEALERSHIP_TIMEZONE": "America/Chicago"}).test_client()  # -05:50:36, written -05:51
    make_car(client)
    refused = client.get(f"{API}/cars/1/quote", query_string=window("0001-01-01T05:50:50Z", "2035-01-15T10:00:00Z"))
    assert_problem(refused, 422, "start_datetime")


def absolute(port, method, url, body):
    """One request whose request line names the whole URL (absolute form, as sent to a proxy)."""
    data = json.dumps(body).encode()
    with closing(socket.create_connection(("127.0.0.1", port), timeout=10)) as conn:
        conn.sendall(f"{method} {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(payload)


def test_under_serve_a_path_with_extra_slashes_at_its_start_is_404_as_under_the_test_client(tmp_path, client):
    for answer in (client.post("/%2Fapi/v1/cars", json=car_body()), client.get("//api/v1/cars")):
        assert_problem(answer, 404)
    assert client.get(f"{API}/cars").get_json() == []
    with serving(tmp_path, "--workers", "1") as (server, port):
        assert http(port, "POST", f"{API}/cars", car_body())[0] == 201
        for method, path, body in [("POST", "//api/v1/cars", car_body(vin=vin(2))), ("DELETE", "//api/v1/cars/1", None),
                                   ("POST", "/%2Fapi/v1/cars", car_body(vin=vin(3))), ("GET", "///api/v1/cars", None),
                                   ("PUT", f"http://127.0.0.1:{port}//api/v1/cars/1", {"color": "Red"})]:
            status, problem = http(port, method, path, body) if path.startswith("/") else absolute(port, method, path, body)
            assert (status, problem["status"]) == (404, 404), (method, path)
        assert [(car["id"], car["color"]) for car in http(port, "GET", f"{API}/cars")[1]] == [(1, "Blue")]


def test_refused_writes_are_logged_at_most_once_in_ten_seconds_with_a_count_of_those_left_out(sqlite_file, caplog):
    app = on_file(sqlite_file)
    client, store = app.test_client(), app.extensions["dealership"]
    make_car(client)
    db = store.engine._writer
    db.conn.execute(f"PRAGMA max_page_count = {db.conn.execute('PRAGMA page_count').fetchone()[0]}")  # a full disk
    with caplog.at_level("ERROR", logger="dealership"):
        for n in range(1000):
            response = client.post(f"{API}/cars", json=car_body(vin=vin(n + 2), model="x" * 100))
            if response.status_code != 201:
                break
        for n in range(30):
            assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(n + 2000), model="x" * 100)), 503)
        assert [r.getMessage() for r in caplog.records].count(f"write refused by {sqlite_file}: database or disk is full") == 1
        store.refused_writes.last -= dealership.REFUSED_WRITE_LOG_EVERY  # as if ten seconds had gone by
        assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(3000), model="x" * 100)), 503)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("write refused by")]
    assert lines == [f"write refused by {sqlite_file}: database or disk is full",
                     f"write refused by {sqlite_file}: database or disk is full (and 30 more since the last such line)"]


@pytest.mark.parametrize("start, status", [("9998-12-01", 200), ("9998-12-02", 422), ("9998-12-10", 422)])
def test_the_board_states_the_days_it_shows_exactly_as_it_applies_them(client, start, status):
    response = client.get("/board", query_string={"start": start, "days": 28})
    assert response.status_code == status
    if status == 422:
        assert assert_problem(response, 422, "start")["errors"]["start"] == [
            "Must be a date written YYYY-MM-DD (2035-06-04), from 1971-01-01 to 9998-12-01."]


def unescaped(line):
    """An RFC 5545 TEXT value as written, read back: each backslash escape is one character."""
    return re.sub(r"\\([\\;,nN])", lambda m: "\n" if m[1] in "nN" else m[1], line)


def test_a_backslash_in_a_note_or_name_reaches_the_feed_as_written_not_as_a_line_break(client):
    model, note = r"Note \N", r"Fix C:\Notes\N42; then wash, dry"
    make_car(client, brand="Nissan", model=model)
    assert open_window(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z", note=note).status_code == 201
    text = client.get(f"{API}/cars/1/calendar.ics", query_string=window("2035-01-01T00:00:00Z", "2035-02-01T00:00:00Z"))
    lines = re.sub(r"\r\n[ \t]", "", text.get_data(as_text=True)).split("\r\n")  # unfolded
    summary = next(line for line in lines if line.startswith("SUMMARY:"))
    assert summary == r"SUMMARY:Maintenance: Fix C:\\Notes\\N42\; then wash\, dry (Nissan Note \\N)"
    assert unescaped(summary.removeprefix("SUMMARY:")) == f"Maintenance: {note} (Nissan {model})"
    calendar_name = next(line for line in lines if line.startswith("X-WR-CALNAME:"))
    assert unescaped(calendar_name.removeprefix("X-WR-CALNAME:")) == f"Dealership: Nissan {model} (car 1)"


def test_a_422_repeats_at_most_100_characters_of_a_name_the_client_sent(client):
    name = "x" * 200_000
    for response in (client.get(f"{API}/cars", query_string={name: "1"}),
                     client.post(f"{API}/dealers", json={"name": "North", name: 1})):
        body = assert_problem(response, 422)
        shown = "x" * 99 + "\u2026"
        assert body["errors"] == {shown: ["Unknown field."]} and body["detail"] == f"Invalid input: {shown}."
        assert len(response.get_data()) < 1000
    assert len(client.get(f"{API}/dealers").get_json()) == 1
    short = assert_problem(client.get(f"{API}/cars", query_string={"y" * 100: "1"}), 422)
    assert list(short["errors"]) == ["y" * 100]


# ---------------------------------------------------------------------------------------------
# Operating: request ids, the access log, JSON log lines, metrics and readiness
# ---------------------------------------------------------------------------------------------


def metric_values(text):
    """{(sample name, frozenset of labels): value} from a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric(values, name, **labels):
    return values.get((name, frozenset(labels.items())), 0)


def scrape(client, **headers):
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200 and response.mimetype == "text/plain", response.data
    return metric_values(response.get_data(as_text=True))


@pytest.mark.parametrize("sent", ["abc-123", "Root=1-5759e988-bd862e3fe1be46a994272793", "x" * 200, "a b ~!"])
def test_a_sane_request_id_is_kept_on_the_response_and_in_a_problem(client, sent):
    found = client.get(f"{API}/cars", headers={"X-Request-ID": sent})
    assert found.status_code == 200 and found.headers["X-Request-ID"] == sent
    missing = client.get(f"{API}/cars/9", headers={"X-Request-ID": sent})
    assert_problem(missing, 404)
    assert missing.headers["X-Request-ID"] == sent and missing.get_json()["request_id"] == sent


@pytest.mark.parametrize("sent", [None, "", "x" * 201, "tab\there", "del\x7f", "caf\xe9"])
def test_a_missing_or_malformed_request_id_is_replaced_by_a_new_one(client, sent):
    headers = {} if sent is None else {"X-Request-ID": sent}
    first = client.post(f"{API}/cars", json={}, headers=headers)
    second = client.post(f"{API}/cars", json={}, headers=headers)
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", one) for one in ids) and ids[0] != ids[1]
    assert [first.get_json()["request_id"], second.get_json()["request_id"]] == ids
    assert client.get(f"{API}/cars").get_json() == []  # the refused requests changed nothing


def test_every_kind_of_answer_carries_the_request_id(client):
    """Routing misses, the docs, health, the board and refusals by the rate limiter too."""
    app = new_app({"DEALERSHIP_API_KEY": "k" * 16, "DEALERSHIP_REFUSED_KEY_LIMIT": "1/minute"})
    limited = app.test_client()
    limited.post(f"{API}/cars", json=car_body())
    refused = limited.post(f"{API}/cars", json=car_body(), headers={"X-Request-ID": "limited-1"})
    assert_problem(refused, 429)
    assert refused.get_json()["request_id"] == refused.headers["X-Request-ID"] == "limited-1"
    for path in ["/nowhere", "/openapi.json", "/health", "/health/ready", "/board", f"{API}/", "/metrics"]:
        assert client.get(path, headers={"X-Request-ID": "seen"}).headers["X-Request-ID"] == "seen", path


def test_every_log_line_of_a_request_names_its_id_the_stores_included(caplog):
    client = new_app({"DEALERSHIP_ACCESS_LOG": "on"}).test_client()
    caplog.clear()
    with caplog.at_level("INFO", logger="dealership"):
        client.post(f"{API}/cars", json=car_body(), headers={"X-Request-ID": "trace-car"})
        client.post(f"{API}/bookings", json=booking_body(1), headers={"X-Request-ID": "trace-booking"})
        client.delete(f"{API}/bookings/1", headers={"X-Request-ID": "trace-cancel"})
    lines = {(record.name, record.getMessage().split(":")[0], record.request_id) for record in caplog.records}
    assert ("dealership", "car 1 created", "trace-car") in lines  # the store's own line
    assert ("dealership", "booking 1 created", "trace-booking") in lines
    assert ("dealership", "booking 1 cancelled", "trace-cancel") in lines
    access = [record for record in caplog.records if record.name == "dealership.access"]
    assert [record.request_id for record in access] == ["trace-car", "trace-booking", "trace-cancel"]
    assert all(record.request_id in {"trace-car", "trace-booking", "trace-cancel"} for record in caplog.records), \
        [(record.name, record.getMessage()) for record in caplog.records if not hasattr(record, "request_id")]


def test_the_text_line_shows_the_request_id_and_a_line_outside_a_request_shows_none():
    formatter = dealership.LogFormatter()
    inside = logging.LogRecord("dealership", logging.INFO, __file__, 1, "booking %d created", (4,), None)
    inside.request_id = "trace-1"
    outside = logging.LogRecord("dealership", logging.INFO, __file__, 1, "demo data loaded", (), None)
    assert LOG_LINE.match(formatter.format(inside)) and " dealership [trace-1]: booking 4 created" in formatter.format(inside)
    assert LOG_LINE.match(formatter.format(outside)) and " dealership: demo data loaded" in formatter.format(outside)


def test_a_host_app_that_sets_its_own_request_ids_keeps_them():
    from flask import g

    host = host_app("host")

    @host.before_request
    def own_id():
        g.request_id = "host-7"

    dealership.init_app(host, url_prefix="/dealership/api/v1")
    client = host.test_client()
    missing = client.get("/dealership/api/v1/cars/3", headers={"X-Request-ID": "from-the-client"})
    assert missing.headers["X-Request-ID"] == "host-7" and missing.get_json()["request_id"] == "host-7"


def test_the_access_log_has_one_line_per_request_with_its_fields_and_never_a_customers_details(caplog):
    app = new_app({"DEALERSHIP_ACCESS_LOG": "on", "DEALERSHIP_PROXIES": 1})
    client = app.test_client()
    make_car(client)
    caplog.clear()
    with caplog.at_level("INFO", logger="dealership.access"):
        client.post(f"{API}/bookings", json=booking_body(1, customer_name="Ada Lovelace", customer_email="ada@example.com"),
                    headers={"X-Forwarded-For": "203.0.113.9", "X-Request-ID": "r-1"})
        client.get(f"{API}/bookings?customer_email=ada%40example.com&limit=5&customer_name=Ada",
                   headers={"X-Forwarded-For": "203.0.113.9"})
        client.get(f"{API}/cars/1%0Aforged line")
    access = [record for record in caplog.records if record.name == "dealership.access"]
    assert len(access) == 3
    made = access[0]
    assert (made.client, made.method, made.path, made.status, made.request_id) == \
        ("203.0.113.9", "POST", f"{API}/bookings", 201, "r-1")
    assert made.bytes > 0 and made.duration_ms >= 0
    assert made.getMessage().startswith(f'203.0.113.9 "POST {API}/bookings" 201 {made.bytes} B ')
    assert access[1].path == f"{API}/bookings?customer_email=...&limit=5&customer_name=..."
    assert access[2].path == f"{API}/cars/1%0Aforged%20line" and access[2].status == 404
    text = caplog.text
    assert "Ada" not in text and "ada@example.com" not in text and "ada%40" not in text


@pytest.mark.parametrize("setting", [None, "off"])
def test_the_access_log_is_off_outside_serve_unless_turned_on(caplog, setting):
    client = new_app({} if setting is None else {"DEALERSHIP_ACCESS_LOG": setting}).test_client()
    with caplog.at_level("INFO", logger="dealership.access"):
        assert client.get(f"{API}/cars").status_code == 200
    assert not [record for record in caplog.records if record.name == "dealership.access"]


def test_json_lines_carry_the_fields_a_log_shipper_reads():
    formatter = dealership.JsonLogFormatter()
    record = logging.LogRecord("dealership.access", logging.INFO, __file__, 1, "%(status)s", ({"status": 201},), None)
    record.request_id, record.status = "trace-2", 201
    line = json.loads(formatter.format(record))
    assert {"time", "level", "logger", "pid", "message", "request_id", "status"} <= set(line)
    assert (line["level"], line["logger"], line["pid"], line["message"], line["request_id"], line["status"]) == \
        ("INFO", "dealership.access", os.getpid(), "201", "trace-2", 201)
    assert datetime.fromisoformat(line["time"]).utcoffset() is not None


@pytest.mark.parametrize("name, value, message", [
    ("DEALERSHIP_LOG_FORMAT", "yaml", "must be one of: text, json"),
    ("DEALERSHIP_ACCESS_LOG", "sometimes", "must be one of 1, 0"),
    ("DEALERSHIP_METRICS_KEY", "short", "at least 16 printable ASCII characters"),
])
def test_operating_settings_are_checked(name, value, message):
    with pytest.raises(dealership.ConfigError, match=message):
        new_app({name: value})


def test_metrics_count_requests_by_route_template_and_status_and_time_them(client):
    make_car(client)
    for _ in range(3):
        client.get(f"{API}/cars/1")
    client.get(f"{API}/cars/2")
    client.get("/nowhere/at/all")
    client.open(f"{API}/cars", method="BREW")
    values = scrape(client)
    route = f"{API}/cars/<digits:car_id>"
    assert metric(values, "dealership_http_requests_total", method="GET", route=route, status="200") == 3
    assert metric(values, "dealership_http_requests_total", method="GET", route=route, status="404") == 1
    assert metric(values, "dealership_http_requests_total", method="POST", route=f"{API}/cars", status="201") == 1
    assert metric(values, "dealership_http_requests_total", method="GET", route="unmatched", status="404") == 1
    assert metric(values, "dealership_http_requests_total", method="other", route="unmatched", status="405") == 1
    assert metric(values, "dealership_http_request_duration_seconds_count", method="GET", route=route) == 4
    assert metric(values, "dealership_http_request_duration_seconds_bucket", method="GET", route=route, le="+Inf") == 4
    assert metric(values, "dealership_http_request_duration_seconds_sum", method="GET", route=route) > 0


def test_a_thousand_car_ids_add_no_new_series(client):
    make_car(client)

    def ask(car_ids):
        for car_id in car_ids:
            client.get(f"{API}/cars/{car_id}")
            client.get(f"{API}/cars/{car_id}/x{car_id}")  # a path that matches no route
    ask(range(1, 11))
    scrape(client)  # /metrics counts itself from here on
    before = scrape(client)
    ask(range(11, 1011))
    after = scrape(client)
    assert after.keys() == before.keys()
    routes = {dict(labels).get("route") for _, labels in after} - {None}
    assert routes == {f"{API}/cars", f"{API}/cars/<digits:car_id>", "unmatched", "/metrics"}


def test_metrics_count_bookings_and_refusals_by_reason_and_the_records_stored(client):
    make_car(client)
    make_car(client, vin=vin(2), status="maintenance")
    client.patch(f"{API}/dealers/1", json={"turnaround_minutes": 60})
    book(client, 1)
    book(client, 1, start="2035-01-20T10:00:00Z", end="2035-01-20T12:00:00Z")
    client.patch(f"{API}/bookings/2", json={"end_datetime": "2035-01-20T13:00:00Z"})
    client.delete(f"{API}/bookings/2")
    client.post(f"{API}/cars/1/maintenance-windows", json=window("2035-02-01T10:00:00Z", "2035-02-01T12:00:00Z"))
    refusals = {"overlap": book(client, 1), "turnaround": book(client, 1, start="2035-01-15T12:30:00Z",
                                                                    end="2035-01-15T13:00:00Z"),
                "maintenance": book(client, 1, start="2035-02-01T11:00:00Z", end="2035-02-01T15:00:00Z"),
                "car_not_available": book(client, 2),
                "in_the_past": book(client, 1, start="2020-01-01T10:00:00Z", end="2020-01-01T12:00:00Z"),
                "invalid_input": client.post(f"{API}/bookings", json={}),
                "conflict": client.post(f"{API}/cars", json=car_body())}  # the VIN is taken
    assert {reason: response.status_code for reason, response in refusals.items()} == {
        "overlap": 409, "turnaround": 409, "maintenance": 409, "car_not_available": 409, "in_the_past": 422,
        "invalid_input": 422, "conflict": 409}
    values = scrape(client)
    for reason in refusals:
        assert metric(values, "dealership_refusals_total", reason=reason) == 1, reason
    assert metric(values, "dealership_refusals_total", reason="unauthorized") == 0
    assert [metric(values, "dealership_bookings_total", action=action) for action in ("created", "changed", "cancelled")] \
        == [2, 1, 1]
    assert [metric(values, "dealership_records", kind=kind) for kind in dealership.RECORD_KINDS] == [1, 2, 1, 1]
    assert metric(values, "dealership_write_batch_size_count") == metric(values, "dealership_commit_duration_seconds_count") \
        == 8  # the writes that held: two cars, a dealer, two bookings, a change, a cancel, a window
    assert metric(values, "dealership_write_batch_size_sum") == 8
    assert time.time() - 60 < metric(values, "dealership_caught_up_timestamp_seconds") <= time.time()


def test_metrics_count_refused_keys_and_rate_limits():
    client = new_app({"DEALERSHIP_API_KEY": "k" * 16, "DEALERSHIP_REFUSED_KEY_LIMIT": "2/minute"}).test_client()
    for _ in range(3):
        client.post(f"{API}/cars", json=car_body(), headers={"Authorization": "Bearer wrong"})
    values = scrape(client)
    assert metric(values, "dealership_refusals_total", reason="unauthorized") == 2
    assert metric(values, "dealership_refusals_total", reason="rate_limited") == 1


@pytest.mark.parametrize("on_a_file", [False, True])
def test_a_write_group_counts_one_batch_of_its_size(sqlite_file, on_a_file):
    app = on_file(sqlite_file) if on_a_file else new_app({"DEALERSHIP_DATABASE": ":memory:"})
    client = five_bookings_at_once(app)
    # four cars, the held write, [car 1, car 2, car 3 refused], [car 1 again refused, car 4]
    values = scrape(client)
    assert metric(values, "dealership_write_batch_size_count") == 7
    assert metric(values, "dealership_write_batch_size_sum") == 10
    assert [metric(values, "dealership_write_batch_size_bucket", le=le) for le in ("1.0", "2.0", "4.0")] == [5, 6, 7]
    assert metric(values, "dealership_commit_duration_seconds_count") == 7


def test_changes_made_by_another_process_are_counted_when_applied(database):
    first, second = new_app({"DEALERSHIP_DATABASE": database}), new_app({"DEALERSHIP_DATABASE": database})
    make_car(first.test_client())
    book(first.test_client(), 1)
    values = scrape(second.test_client())  # /metrics catches up first
    assert metric(values, "dealership_changes_applied_total") == 2
    assert metric(values, "dealership_records", kind="bookings") == 1


def test_a_storage_failure_answered_503_is_counted(sqlite_file):
    app = new_app({"DEALERSHIP_DATABASE": sqlite_file})
    client = app.test_client()
    os.remove(sqlite_file)
    assert_problem(client.post(f"{API}/cars", json=car_body()), 503)
    assert_problem(client.get("/health"), 503)
    assert_problem(client.get("/health/ready"), 503)
    assert metric(scrape(client), "dealership_storage_unavailable_total") == 3


def test_metrics_need_their_own_key_when_one_is_set():
    key = "m" * 20
    client = new_app({"DEALERSHIP_METRICS_KEY": key, "DEALERSHIP_API_KEY": "k" * 16}).test_client()
    for headers in [{}, {"Authorization": "Bearer " + "k" * 16}, {"Authorization": "Bearer " + "m" * 19}]:
        refused = client.get("/metrics", headers=headers)
        assert_problem(refused, 401)
        assert "DEALERSHIP_METRICS_KEY" in refused.get_json()["detail"]
    assert metric(scrape(client, Authorization=f"Bearer {key}"), "dealership_refusals_total", reason="unauthorized") == 3


def test_ready_when_the_database_answers_and_the_store_has_caught_up(database):
    first, second = new_app({"DEALERSHIP_DATABASE": database}), new_app({"DEALERSHIP_DATABASE": database})
    make_car(first.test_client())
    ready = second.test_client().get("/health/ready")
    assert ready.status_code == 200 and ready.get_json()["status"] == "ready"
    assert second.extensions["dealership"].fleet.cars.keys() == {1}  # readiness caught it up


def test_under_serve_json_lines_access_log_and_metrics_summed_over_workers_a_replaced_ones_kept(tmp_path):
    """Two workers; requests spread over both; one killed -9 and replaced: /metrics, from either, counts
    every request once; every line is one JSON object; serve removes the metrics folder it made."""
    settings = {"DEALERSHIP_LOG_FORMAT": "json", "TMPDIR": str(tmp_path)}
    with serving(tmp_path, "--workers", "2", settings=settings) as (server, port):
        workers = workers_of(server.pid)
        assert http(port, "POST", f"{API}/cars", car_body())[0] == 201
        for n in range(20):  # a new connection each: both workers take some
            assert http(port, "GET", f"{API}/cars/1", headers={"X-Request-ID": f"first-{n}"})[0] == 200
        time.sleep(0.5)  # a worker writes its lines within LOG_PAUSE: those of the last instants die with it
        os.kill(workers[0], 9)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(workers_of(server.pid)) != 2 or workers[0] in workers_of(server.pid)):
            time.sleep(0.1)
        time.sleep(1)
        for n in range(20):
            assert http(port, "GET", f"{API}/cars/1", headers={"X-Request-ID": f"second-{n}"})[0] == 200
        for _ in range(4):  # whichever worker answers, the same sums
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
                values = metric_values(response.read().decode())
            route = f"{API}/cars/<digits:car_id>"
            assert metric(values, "dealership_http_requests_total", method="GET", route=route, status="200") == 40
            assert metric(values, "dealership_http_requests_total", method="POST", route=f"{API}/cars",
                          status="201") == 1
            assert metric(values, "dealership_records", kind="cars") == 1
        assert [path.name for path in tmp_path.iterdir() if path.name.startswith("dealership-metrics-")]
        server.send_signal(15)
        assert server.wait(timeout=30) == 0
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith("dealership-metrics-")]
    lines = [json.loads(line) for line in open(tmp_path / "served.log").read().splitlines()]
    assert all({"time", "level", "logger", "pid", "message", "request_id"} <= set(line) for line in lines)
    access = [line for line in lines if line["logger"] == "dealership.access" and line["path"] == f"{API}/cars/1"]
    assert sorted(line["request_id"] for line in access) == sorted([f"first-{n}" for n in range(20)] +
                                                                   [f"second-{n}" for n in range(20)])
    assert len({line["pid"] for line in access}) >= 2
    created = [line for line in lines if line["message"].startswith("car 1 created")]
    assert len(created) == 1 and created[0]["request_id"] in {line["request_id"] for line in lines
                                                               if line.get("method") == "POST"}
    assert (created[0]["event"], created[0]["car_id"], created[0]["dealer_id"]) == ("car created", 1, 1)


def test_under_serve_the_access_log_is_on_unless_turned_off(tmp_path):
    with serving(tmp_path, "--workers", "1", settings={"DEALERSHIP_ACCESS_LOG": "off"}) as (server, port):
        assert http(port, "GET", f"{API}/cars", headers={"X-Request-ID": "quiet"})[0] == 200
        server.send_signal(15)
        assert server.wait(timeout=30) == 0
    assert "quiet" not in open(tmp_path / "served.log").read()


def test_with_metrics_off_nothing_is_counted_and_there_is_no_page():
    client = new_app({"DEALERSHIP_METRICS": "off"}).test_client()
    assert client.get(f"{API}/cars").status_code == 200
    off = client.get("/metrics")
    assert_problem(off, 404)
    assert "DEALERSHIP_METRICS=off" in off.get_json()["detail"]
    counted = client.application.extensions["dealership"].metrics.requests.collect()[0].samples
    assert counted == []


def test_a_host_app_can_serve_the_services_metrics_itself():
    import prometheus_client

    host = host_app("host")
    dealership.init_app(host, url_prefix="/dealership/api/v1")
    host.test_client().get("/dealership/api/v1/cars")
    page = prometheus_client.generate_latest(host.extensions["dealership"].metrics.registry).decode()
    assert metric(metric_values(page), "dealership_http_requests_total", method="GET",
                  route="/dealership/api/v1/cars", status="200") == 1


def test_serves_log_writer_writes_every_line_in_order_from_its_thread_and_the_rest_at_close(monkeypatch):
    import io

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    writer = dealership.LogWriter()
    writer.setFormatter(dealership.LogFormatter())
    logger = logging.getLogger("dealership.writer_test")
    logger.propagate, logger.level = False, logging.INFO
    logger.addHandler(writer)
    try:
        for n in range(2500):  # more than one batch
            logger.info("line %d", n, extra={"request_id": f"r{n}"})
        wait_until(lambda: stream.getvalue().count("\n") >= 100)  # written without a close
        logger.info("the last", extra={"request_id": "last"})
    finally:
        logger.removeHandler(writer)
        writer.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2501 and all(LOG_LINE.match(line) for line in lines)
    assert [line.split(": ", 1)[1] for line in lines] == [f"line {n}" for n in range(2500)] + ["the last"]
    assert "[r7]: line 7" in lines[7] and not writer.writer.is_alive()


@pytest.mark.parametrize("created", [1_000_000_000.25, 2_000_000_000.999, 1_700_000_000.0])
def test_the_log_time_worked_out_once_a_second_is_the_records_own(created):
    formatter = dealership.LogFormatter()
    for offset in (0, 0.5, 1.001):  # the same second again, then the next
        record = logging.LogRecord("dealership", logging.INFO, __file__, 1, "m", (), None)
        record.created = created + offset
        assert formatter.formatTime(record) == \
            datetime.fromtimestamp(created + offset).astimezone().isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------------------------
# Safe retries (Idempotency-Key), safe edits (ETag, If-Match), holds, and the change feed
# ---------------------------------------------------------------------------------------------

KEY = {"Idempotency-Key": "3f1c2a9e-retry-me"}


def post(client, path, body, **headers):
    return client.post(f"{API}{path}", json=body, headers=headers)


def hold(client, car_id, start="2035-01-15T10:00:00Z", end="2035-01-15T12:00:00Z", **fields):
    return post(client, "/holds", {"car_id": car_id, "start_datetime": start, "end_datetime": end} | fields)


def insert_hold(database, car_id, start, end, expires):
    """A hold written straight into the database (one about to expire, say); its id."""
    sql(database, "INSERT INTO holds (car_id, start_datetime, end_datetime, expires_at) VALUES (?, ?, ?, ?)",
        (car_id, datetime.fromisoformat(start), datetime.fromisoformat(end), expires))
    return sql(database, "SELECT max(id) FROM holds")[0][0]


def bookings_of(client, car_id):
    return client.get(f"{API}/bookings", query_string={"car_id": car_id}).get_json()


CUSTOMER = {"customer_name": "Ada Lovelace", "customer_email": "ada@example.com"}


# -- Idempotency-Key ------------------------------------------------------------------------------

def test_a_retried_post_with_its_key_gets_the_same_answer_and_books_once(client):
    make_car(client)
    first = post(client, "/bookings", booking_body(1), **KEY)
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    again = post(client, "/bookings", booking_body(1), **KEY)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.get_data() == first.get_data()
    assert again.headers["Location"] == first.headers["Location"] == f"{API}/bookings/1"
    assert again.headers["ETag"] == first.headers["ETag"]
    assert len(client.get(f"{API}/bookings").get_json()) == 1


def test_every_post_put_and_patch_keeps_its_answer_for_its_key(client):
    """Each route that writes with POST, PUT or PATCH: replayed once, and changes nothing the second time."""
    make_car(client)
    calls = [("post", "/dealers", {"name": "North"}), ("patch", "/dealers/2", {"location": "Kiel"}),
             ("post", "/cars", car_body(vin=vin(2))), ("put", "/cars/2", {"color": "Red"}),
             ("patch", "/cars/2", {"color": "Green"}), ("post", "/bookings", booking_body(1)),
             ("patch", "/bookings/1", {"customer_name": "Grace"}),
             ("post", "/cars/1/maintenance-windows", window("2035-02-01T08:00:00Z", "2035-02-01T12:00:00Z")),
             ("post", "/holds", {"car_id": 2, "start_datetime": "2035-03-01T10:00:00Z",
                                 "end_datetime": "2035-03-01T12:00:00Z"}),
             ("post", "/holds/1/confirm", CUSTOMER)]
    app = client.application
    routes = {(method, rule.rule) for rule in app.url_map.iter_rules() if rule.endpoint.startswith("dealership.")
              for method in rule.methods & {"POST", "PUT", "PATCH"}}
    called = {(method.upper(), API + re.sub(r"/\d+", lambda m: "/<digits:>", path)) for method, path, _ in calls}
    assert {(method, re.sub(r"<digits:\w+>", "<digits:>", rule)) for method, rule in routes} == called
    for n, (method, path, body) in enumerate(calls):
        headers = {"Idempotency-Key": f"key-{n}"}
        first = getattr(client, method)(f"{API}{path}", json=body, headers=headers)
        assert first.status_code in (200, 201), (path, first.get_json())
        before = state(client)
        again = getattr(client, method)(f"{API}{path}", json=body, headers=headers)
        assert (again.status_code, again.get_data(), again.headers["Idempotent-Replayed"]) == \
            (first.status_code, first.get_data(), "true"), path
        assert state(client) == before


def test_the_same_key_with_another_request_is_422_and_changes_nothing(client):
    make_car(client)
    assert post(client, "/bookings", booking_body(1), **KEY).status_code == 201
    before = state(client)
    for other in (booking_body(1, "2035-02-01T10:00:00Z", "2035-02-01T12:00:00Z"), car_body(vin=vin(9))):
        path = "/bookings" if "customer_name" in other else "/cars"
        body = assert_problem(post(client, path, other, **KEY), 422, "Idempotency-Key")
        assert "used for another request" in body["errors"]["Idempotency-Key"][0]
    assert_problem(client.patch(f"{API}/bookings/1", json={"customer_name": "X"}, headers=KEY), 422, "Idempotency-Key")
    assert state(client) == before


def test_a_key_sent_with_another_api_key_is_another_request():
    client = new_app({"DEALERSHIP_API_KEY": "s3cret-key-for-tests"}).test_client()
    bearer = {"Authorization": "Bearer s3cret-key-for-tests"}
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer | KEY).status_code == 201
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer | KEY).headers["Idempotent-Replayed"] == "true"
    assert client.post(f"{API}/cars", json=car_body(), headers=KEY).status_code == 401  # no key: not replayed


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_malformed_idempotency_key_is_400_and_changes_nothing(client, key):
    response = client.post(f"{API}/cars", json=car_body(), headers={"Idempotency-Key": key.encode().decode("latin-1")})
    body = assert_problem(response, 400)
    assert "Idempotency-Key" in body["detail"]
    assert client.get(f"{API}/cars").get_json() == []


def test_a_refused_request_keeps_nothing_so_its_corrected_retry_with_the_key_works(client):
    make_car(client)
    assert_problem(post(client, "/bookings", booking_body(1, customer_email="not-an-address"), **KEY), 422)
    assert_problem(post(client, "/bookings", booking_body(2), **KEY), 404)
    book(client, 1)
    assert_problem(post(client, "/bookings", booking_body(1), **KEY), 409)  # the slot is taken
    response = post(client, "/bookings", booking_body(1, "2035-02-01T10:00:00Z", "2035-02-01T12:00:00Z"), **KEY)
    assert response.status_code == 201 and "Idempotent-Replayed" not in response.headers


def test_a_key_is_answered_again_through_another_app_and_after_a_restart(database):
    first = on_file(database).test_client()
    make_car(first)
    original = post(first, "/bookings", booking_body(1), **KEY)
    second = on_file(database).test_client()
    for client in (second, on_file(database).test_client()):  # another process; a restart
        again = post(client, "/bookings", booking_body(1), **KEY)
        assert (again.status_code, again.get_data(), again.headers["Idempotent-Replayed"]) == \
            (201, original.get_data(), "true")
        assert_problem(post(client, "/bookings", booking_body(1, customer_name="Grace"), **KEY), 422)
    assert len(second.get_json() if False else second.get(f"{API}/bookings").get_json()) == 1


def test_20_threads_sending_one_key_through_two_apps_make_one_booking(database):
    apps = [on_file(database), on_file(database)]
    make_car(apps[0].test_client())
    responses = run_at_once(20, lambda i: post(apps[i % 2].test_client(), "/bookings", booking_body(1), **KEY))
    made = [r for r in responses if r.status_code == 201]
    assert made and all(r.status_code in (201, 409) for r in responses), [r.status_code for r in responses]
    assert len([r for r in made if "Idempotent-Replayed" not in r.headers]) == 1
    assert len({r.get_data() for r in made}) == 1
    for r in responses:
        if r.status_code == 409:
            assert "still being handled" in r.get_json()["detail"]
    for app in apps:
        assert len(app.test_client().get(f"{API}/bookings").get_json()) == 1


def test_old_answers_count_no_more_and_are_pruned(database, monkeypatch):
    monkeypatch.setattr(dealership, "ANSWERS_PRUNE_EVERY", 1)
    client = on_file(database, DEALERSHIP_IDEMPOTENCY_HOURS=0.25 / 3600).test_client()  # a quarter of a second
    make_car(client)
    assert post(client, "/bookings", booking_body(1), **{"Idempotency-Key": "old"}).status_code == 201
    time.sleep(0.3)
    # the key is free again: the same key with another request runs as new
    response = post(client, "/bookings", booking_body(1, "2035-02-01T10:00:00Z", "2035-02-01T12:00:00Z"),
                    **{"Idempotency-Key": "old"})
    assert response.status_code == 201 and "Idempotent-Replayed" not in response.headers
    time.sleep(0.3)
    assert post(client, "/dealers", {"name": "North"}, **{"Idempotency-Key": "new"}).status_code == 201
    assert [key for key, in sql(database, "SELECT key FROM idempotency_keys")] == ["open new"]  # each API key's own


@pytest.mark.parametrize("value", ["0", "-1", "abc", "9000"])
def test_idempotency_hours_must_be_a_sensible_number(value):
    with pytest.raises(dealership.ConfigError, match="DEALERSHIP_IDEMPOTENCY_HOURS"):
        new_app({"DEALERSHIP_IDEMPOTENCY_HOURS": value})


# -- ETag, If-None-Match, If-Match ----------------------------------------------------------------

def test_every_single_record_has_an_etag_that_changes_with_each_change(client):
    make_car(client)
    book(client, 1)
    open_window(client, 1, "2035-02-01T08:00:00Z", "2035-02-01T12:00:00Z")
    for path in ("/dealers/1", "/cars/1", "/bookings/1", "/cars/1/maintenance-windows/1"):
        response = client.get(f"{API}{path}")
        tag = response.headers["ETag"]
        assert tag.startswith('"1.') and not response.headers["ETag"].startswith("W/")
        unchanged = client.get(f"{API}{path}", headers={"If-None-Match": tag})
        assert unchanged.status_code == 304 and unchanged.get_data() == b"" and unchanged.headers["ETag"] == tag
        assert client.get(f"{API}{path}", headers={"If-None-Match": '"0.x"'}).status_code == 200
    tags = {path: client.get(f"{API}{path}").headers["ETag"] for path in ("/dealers/1", "/cars/1", "/bookings/1")}
    for path, change in [("/dealers/1", {"location": "Kiel"}), ("/cars/1", {"color": "Red"}),
                         ("/bookings/1", {"customer_name": "Grace"})]:
        response = client.patch(f"{API}{path}", json=change)
        assert response.headers["ETag"] != tags[path] and response.headers["ETag"].startswith('"2.')
        assert client.get(f"{API}{path}").headers["ETag"] == response.headers["ETag"]
        assert client.get(f"{API}{path}", headers={"If-None-Match": tags[path]}).status_code == 200


def test_an_etag_is_the_same_in_every_process_and_after_a_restart(database):
    first = on_file(database).test_client()
    make_car(first)
    book(first, 1)
    second = on_file(database).test_client()
    tag = second.patch(f"{API}/bookings/1", json={"customer_name": "Grace"}).headers["ETag"]
    for client in (first, second, on_file(database).test_client()):
        assert client.get(f"{API}/bookings/1").headers["ETag"] == tag
        assert client.get(f"{API}/bookings/1", headers={"If-None-Match": tag}).status_code == 304


def test_if_match_with_another_version_is_412_and_changes_nothing(client):
    make_car(client)
    book(client, 1)
    open_window(client, 1, "2035-02-01T08:00:00Z", "2035-02-01T12:00:00Z")
    client.patch(f"{API}/cars/1", json={"daily_price": 120.0})  # the car is at version 2
    before = state(client)
    stale = {"If-Match": '"1.00000000"'}
    for method, path, body in [("patch", "/cars/1", {"color": "Red"}), ("put", "/cars/1", {"color": "Red"}),
                               ("delete", "/cars/1", None), ("patch", "/dealers/1", {"location": "Kiel"}),
                               ("delete", "/dealers/1", None), ("patch", "/bookings/1", {"customer_name": "Grace"}),
                               ("delete", "/bookings/1", None), ("delete", "/cars/1/maintenance-windows/1", None)]:
        response = getattr(client, method)(f"{API}{path}", json=body, headers=stale)
        assert "If-Match names another version" in assert_problem(response, 412)["detail"], path
    assert state(client) == before


def test_if_match_with_the_current_tag_or_a_star_makes_the_change(client):
    make_car(client)
    book(client, 1)
    tag = client.get(f"{API}/bookings/1").headers["ETag"]
    response = client.patch(f"{API}/bookings/1", json={"customer_name": "Grace"}, headers={"If-Match": tag})
    assert response.status_code == 200 and response.get_json()["customer_name"] == "Grace"
    assert client.patch(f"{API}/cars/1", json={"color": "Red"}, headers={"If-Match": "*"}).status_code == 200
    tags = f'"0.x", {response.headers["ETag"]}'  # any of the tags listed
    assert client.delete(f"{API}/bookings/1", headers={"If-Match": tags}).status_code == 204
    assert client.delete(f"{API}/bookings/1", headers={"If-Match": "*"}).status_code == 404


def test_two_patches_sent_with_one_tag_through_two_apps_one_200_one_412(database):
    apps = [on_file(database), on_file(database)]
    client = apps[0].test_client()
    make_car(client)
    book(client, 1)
    for round in range(5):
        tag = client.get(f"{API}/bookings/1").headers["ETag"]
        names = [f"Grace {round}", f"Ada {round}"]
        responses = run_at_once(2, lambda i: apps[i].test_client().patch(
            f"{API}/bookings/1", json={"customer_name": names[i]}, headers={"If-Match": tag}))
        assert sorted(r.status_code for r in responses) == [200, 412]
        winner = next(r for r in responses if r.status_code == 200).get_json()["customer_name"]
        for app in apps:
            assert app.test_client().get(f"{API}/bookings/1").get_json()["customer_name"] == winner


# -- holds ----------------------------------------------------------------------------------------

def test_a_hold_takes_its_period_as_a_booking_does_until_confirmed(client):
    make_car(client)
    response = hold(client, 1)
    assert response.status_code == 201 and response.headers["Location"] == f"{API}/holds/1"
    created = response.get_json()
    assert list(created) == ["id", "car_id", "start_datetime", "end_datetime", "expires_at"]
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(minutes=9) < expires - datetime.now(timezone.utc) <= timedelta(minutes=10)
    assert client.get(f"{API}/holds/1").get_json() == created
    before = state(client)
    detail = assert_problem(book(client, 1, "2035-01-15T11:00:00Z", "2035-01-15T13:00:00Z"), 409)["detail"]
    assert "is held from 2035-01-15T10:00:00+00:00" in detail and created["expires_at"] in detail
    assert_problem(hold(client, 1, "2035-01-15T11:59:00Z", "2035-01-15T13:00:00Z"), 409)
    assert_problem(open_window(client, 1, "2035-01-15T08:00:00Z", "2035-01-15T11:00:00Z"), 409)
    assert_problem(client.delete(f"{API}/cars/1"), 409)
    assert state(client) == before
    period = window("2035-01-15T09:00:00Z", "2035-01-15T11:00:00Z")
    assert client.get(f"{API}/bookings/available-cars", query_string=period).get_json() == []
    slots = client.get(f"{API}/bookings/available-slots", query_string={
        "duration": "PT2H", "after": "2035-01-15T09:00:00Z"}).get_json()
    assert slots[0]["start_datetime"] == "2035-01-15T12:00:00+00:00"
    calendar = client.get(f"{API}/cars/1/availability", query_string=window("2035-01-15T00:00:00Z",
                                                                             "2035-01-16T00:00:00Z")).get_json()
    assert calendar["held"] == [{"hold_id": 1, "start_datetime": created["start_datetime"],
                                 "end_datetime": created["end_datetime"], "expires_at": created["expires_at"]}]
    assert calendar["available"] is False and calendar["busy"] == []
    booking = client.post(f"{API}/holds/1/confirm", json=CUSTOMER)
    assert booking.status_code == 201 and booking.headers["Location"] == f"{API}/bookings/1"
    assert booking.get_json() | {"id": 0} == {"id": 0, "car_id": 1, "start_datetime": created["start_datetime"],
                                              "end_datetime": created["end_datetime"], "total_price": 100.0,
                                              "currency": "EUR"} | CUSTOMER
    assert_problem(client.get(f"{API}/holds/1"), 404)
    assert_problem(client.post(f"{API}/holds/1/confirm", json=CUSTOMER), 404)
    assert bookings_of(client, 1) == [booking.get_json()]


def test_a_hold_follows_the_turnaround_and_maintenance_rules(client):
    set_turnaround(client, 60)
    make_car(client)
    make_car(client, vin=vin(2), status="maintenance")
    book(client, 1)  # 10:00 to 12:00
    assert "turnaround" in assert_problem(hold(client, 1, "2035-01-15T12:30:00Z", "2035-01-15T14:00:00Z"), 409)["detail"]
    assert_problem(hold(client, 2), 409)
    open_window(client, 1, "2035-01-16T08:00:00Z", "2035-01-16T12:00:00Z")
    assert "maintenance" in assert_problem(hold(client, 1, "2035-01-16T11:00:00Z", "2035-01-16T14:00:00Z"),
                                           409)["detail"]
    assert hold(client, 1, "2035-01-15T13:00:00Z", "2035-01-15T14:00:00Z").status_code == 201
    # and a booking within the turnaround of the hold is refused as for a booking
    assert_problem(book(client, 1, "2035-01-15T14:30:00Z", "2035-01-15T15:00:00Z"), 409)


@pytest.mark.parametrize("fields, name", [
    ({"minutes": 0}, "minutes"), ({"minutes": 31}, "minutes"), ({"minutes": "5"}, "minutes"),
    ({"car_id": 0}, "car_id"), ({"start_datetime": "2020-01-01T10:00:00Z"}, "start_datetime"),
    ({"end_datetime": "2035-01-15T09:00:00Z"}, "end_datetime"), ({"customer_name": "Ada"}, "customer_name")])
def test_a_bad_hold_is_422_and_changes_nothing(client, fields, name):
    make_car(client)
    body = {"car_id": 1, "start_datetime": "2035-01-15T10:00:00Z", "end_datetime": "2035-01-15T12:00:00Z"} | fields
    assert_problem(post(client, "/holds", body), 422, name)
    assert_problem(client.get(f"{API}/holds/1"), 404)
    assert client.get(f"{API}/changes").get_json()["changes"][-1]["type"] == "car"


def test_a_hold_lasts_the_minutes_asked(client):
    make_car(client)
    expires = datetime.fromisoformat(hold(client, 1, minutes=30).get_json()["expires_at"])
    assert timedelta(minutes=29) < expires - datetime.now(timezone.utc) <= timedelta(minutes=30)


def test_a_hold_let_go_frees_its_period_and_a_bad_confirm_keeps_it(client):
    make_car(client)
    hold(client, 1)
    assert_problem(client.post(f"{API}/holds/1/confirm", json={"customer_name": "Ada"}), 422, "customer_email")
    assert client.get(f"{API}/holds/1").status_code == 200
    assert client.delete(f"{API}/holds/1").status_code == 204
    assert_problem(client.delete(f"{API}/holds/1"), 404)
    assert book(client, 1).status_code == 201


def test_holds_need_the_api_key_to_be_made_confirmed_or_let_go(locked):
    bearer = {"Authorization": "Bearer s3cret-key-for-tests"}
    locked.post(f"{API}/cars", json=car_body(), headers=bearer)
    body = {"car_id": 1, "start_datetime": "2035-01-15T10:00:00Z", "end_datetime": "2035-01-15T12:00:00Z"}
    assert_problem(locked.post(f"{API}/holds", json=body), 401)
    assert locked.post(f"{API}/holds", json=body, headers=bearer).status_code == 201
    assert locked.get(f"{API}/holds/1").status_code == 200  # a hold holds no personal data
    assert_problem(locked.post(f"{API}/holds/1/confirm", json=CUSTOMER), 401)
    assert_problem(locked.delete(f"{API}/holds/1"), 401)
    assert locked.post(f"{API}/holds/1/confirm", json=CUSTOMER, headers=bearer).status_code == 201


def test_a_hold_on_the_board_and_in_the_feeds_shows_no_personal_data(client):
    make_car(client)
    hold(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")
    page = client.get("/board", query_string={"start": "2035-01-15"}).get_data(as_text=True)
    assert 'class="bar hold"' in page and 'data-hold-id="1"' in page and "held until" in page
    calendar = icalendar.Calendar.from_ical(client.get(f"{API}/cars/1/calendar.ics", query_string=window(
        "2035-01-14T00:00:00Z", "2035-01-16T00:00:00Z")).get_data())
    assert [str(event["uid"]) for event in calendar.walk("VEVENT")] == ["hold-1@dealership"]


def test_an_expired_hold_is_410_and_its_period_free_to_anyone_in_every_process(database):
    first, second = on_file(database).test_client(), on_file(database).test_client()
    make_car(first)
    expires = datetime.now(timezone.utc) + timedelta(seconds=0.5)
    hold_id = insert_hold(database, 1, "2035-01-15T10:00:00+00:00", "2035-01-15T12:00:00+00:00", expires)
    for client in (first, second):
        assert client.get(f"{API}/holds/{hold_id}").status_code == 200
        assert_problem(book(client, 1), 409)
    time.sleep(max(0.0, (expires - datetime.now(timezone.utc)).total_seconds()) + 0.01)
    period = window("2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z")
    for client in (first, second):
        assert "expired" in assert_problem(client.get(f"{API}/holds/{hold_id}"), 410)["detail"]
        assert [car["id"] for car in client.get(f"{API}/bookings/available-cars", query_string=period).get_json()] == [1]
    before = state(first)
    assert_problem(first.post(f"{API}/holds/{hold_id}/confirm", json=CUSTOMER), 410)
    assert_problem(second.delete(f"{API}/holds/{hold_id}"), 410)
    assert state(first) == before
    assert book(second, 1).status_code == 201


def test_a_hold_confirmed_at_the_instant_it_expires_is_a_booking_or_a_free_slot_never_both(database):
    apps = [on_file(database), on_file(database)]
    confirmer, booker = apps[0].test_client(), apps[1].test_client()
    rounds = 8
    for n in range(1, rounds + 1):
        make_car(confirmer, vin=vin(n))
    outcomes = []
    for n in range(1, rounds + 1):
        expires = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        hold_id = insert_hold(database, n, "2035-01-15T10:00:00+00:00", "2035-01-15T12:00:00+00:00", expires)
        confirmer.get(f"{API}/holds/{hold_id}")  # both apps have caught up with it
        assert_problem(book(booker, n), 409)
        aim = expires + timedelta(milliseconds=(n % 4 - 2) * 0.5)  # around the instant, on both sides

        def confirm(_):
            time.sleep(max(0.0, (aim - datetime.now(timezone.utc)).total_seconds()))
            return confirmer.post(f"{API}/holds/{hold_id}/confirm", json=CUSTOMER).status_code

        def keep_booking(_):
            time.sleep(max(0.0, (aim - datetime.now(timezone.utc)).total_seconds()))
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                status = book(booker, n, customer_name="Grace").status_code
                if status == 201:
                    return status
            return status

        confirmed, booked = run_at_once(2, lambda i: (confirm, keep_booking)[i](i))
        assert (confirmed, booked) in [(201, 409), (410, 201)], (n, confirmed, booked)
        found = bookings_of(confirmer, n)
        assert len(found) == 1 and found[0]["customer_name"] == ("Ada Lovelace" if confirmed == 201 else "Grace")
        outcomes.append(confirmed)


def test_a_hold_raced_by_bookings_on_its_slot_has_one_winner(database):
    apps = [on_file(database), on_file(database)]
    make_car(apps[0].test_client())

    def attempt(i):
        client = apps[i % 2].test_client()
        return (hold(client, 1) if i == 0 else book(client, 1)).status_code
    for round in range(3):
        statuses = run_at_once(21, attempt)
        assert sorted(statuses) == [201] + [409] * 20
        client = apps[0].test_client()
        for booking in bookings_of(client, 1):
            client.delete(f"{API}/bookings/{booking['id']}")
        for change in client.get(f"{API}/changes?limit=1000").get_json()["changes"]:
            if change["type"] == "hold" and change["action"] == "created":
                client.delete(f"{API}/holds/{change['id']}")


def test_holds_that_expired_a_day_ago_are_removed_by_the_next_hold(database, monkeypatch):
    client = on_file(database).test_client()
    make_car(client)
    long_ago = datetime.now(timezone.utc) - timedelta(days=2)
    old = insert_hold(database, 1, "2035-01-15T10:00:00+00:00", "2035-01-15T12:00:00+00:00", long_ago)
    recent = insert_hold(database, 1, "2035-01-16T10:00:00+00:00", "2035-01-16T12:00:00+00:00",
                         datetime.now(timezone.utc) - timedelta(minutes=5))
    assert client.get(f"{API}/holds/{old}").status_code == 410
    assert hold(client, 1, "2035-01-15T10:00:00Z", "2035-01-15T12:00:00Z").status_code == 201  # its period is free
    assert [hold_id for hold_id, in sql(database, "SELECT id FROM holds ORDER BY id")] == [recent, recent + 1]
    assert_problem(client.get(f"{API}/holds/{old}"), 404)
    assert client.get(f"{API}/holds/{recent}").status_code == 410


def test_a_car_with_only_expired_holds_can_be_deleted(database):
    client = on_file(database).test_client()
    make_car(client)
    insert_hold(database, 1, "2035-01-15T10:00:00+00:00", "2035-01-15T12:00:00+00:00",
                datetime.now(timezone.utc) - timedelta(minutes=1))
    assert client.delete(f"{API}/cars/1").status_code == 204
    assert sql(database, "SELECT count(*) FROM holds") == [(0,)]


# -- the change feed ------------------------------------------------------------------------------

def follow(client, since=None, limit=None):
    """Every change after `since`, following `next` page by page; and the last cursor."""
    found = []
    while True:
        query = {name: value for name, value in (("since", since), ("limit", limit)) if value is not None}
        response = client.get(f"{API}/changes", query_string=query)
        assert response.status_code == 200, response.get_json()
        page = response.get_json()
        found += page["changes"]
        if not page["changes"]:
            assert page["next"] == (since or page["next"])
            return found, page["next"]
        since = page["next"]


def test_the_change_feed_gives_each_change_once_in_order_with_its_record(client):
    make_car(client)
    book(client, 1)
    client.patch(f"{API}/bookings/1", json={"customer_name": "Grace"})
    client.delete(f"{API}/bookings/1")
    changes, cursor = follow(client, limit=2)
    assert [(c["type"], c["id"], c["action"]) for c in changes] == [
        ("dealer", 1, "created"), ("car", 1, "created"), ("booking", 1, "created"), ("booking", 1, "changed"),
        ("booking", 1, "deleted")]
    assert changes[1]["record"] == client.get(f"{API}/cars/1").get_json()
    assert changes[2]["record"]["customer_name"] == "Ada Lovelace" and changes[3]["record"]["customer_name"] == "Grace"
    assert changes[4]["record"] is None
    assert len({c["cursor"] for c in changes}) == 5 and cursor == changes[-1]["cursor"]
    assert all(datetime.fromisoformat(c["at"]).tzinfo for c in changes)
    # from any point: what came after it, once
    assert follow(client, since=changes[2]["cursor"])[0] == changes[3:]
    assert client.get(f"{API}/changes").get_json() == {"changes": changes, "next": cursor}


@pytest.mark.parametrize("query_string, name", [("since=abc", "since"), ("since=1.2.3", "since"), ("limit=0", "limit"),
                                                ("limit=1001", "limit"), ("since=", "since"), ("other=1", "other")])
def test_a_bad_feed_query_is_422(client, query_string, name):
    assert_problem(client.get(f"{API}/changes?{query_string}"), 422, name)


def test_the_feed_needs_the_api_key(locked):
    assert_problem(locked.get(f"{API}/changes"), 401)
    response = locked.get(f"{API}/changes", headers={"Authorization": "Bearer s3cret-key-for-tests"})
    assert response.status_code == 200 and response.get_json()["changes"][0]["type"] == "dealer"


def test_the_feed_answers_100_changes_unless_told_and_at_most_1000(client):
    for n in range(150):
        client.post(f"{API}/dealers", json={"name": f"Dealer {n}"})
    assert len(client.get(f"{API}/changes").get_json()["changes"]) == 100
    assert len(client.get(f"{API}/changes?limit=1000").get_json()["changes"]) == 151


def test_a_cursor_older_than_the_log_is_410_with_where_to_follow_on(database, monkeypatch):
    monkeypatch.setattr(dealership, "CHANGE_LOG_KEEP", 10)
    monkeypatch.setattr(dealership, "CHANGE_LOG_PRUNE_EVERY", 5)
    client = on_file(database, DEALERSHIP_HISTORY_DAYS=0).test_client()
    first = client.get(f"{API}/changes").get_json()["changes"][0]["cursor"]
    for n in range(30):
        client.post(f"{API}/dealers", json={"name": f"Dealer {n}"})
    body = assert_problem(client.get(f"{API}/changes", query_string={"since": first}), 410)
    assert "read the collections again" in body["detail"].lower()
    rest, _ = follow(client, since=body["next"])
    assert rest == []
    client.post(f"{API}/dealers", json={"name": "After"})
    assert [c["record"]["name"] for c in follow(client, since=body["next"])[0]] == ["After"]
    oldest = client.get(f"{API}/changes").get_json()["changes"]
    assert 10 <= len(oldest) < 31 and oldest[-1]["record"]["name"] == "After"
    beyond = "999999.0" if "." in first else "999999"  # a cursor of the engine's own form, past the log's end
    assert_problem(client.get(f"{API}/changes", query_string={"since": beyond}), 410)  # not of this database
    other = "1" if "." in first else "1.0"  # the other engine's form
    assert_problem(client.get(f"{API}/changes", query_string={"since": other}), 422, "since")


def test_the_feed_follows_writes_of_other_processes_and_restarts(database):
    first = on_file(database).test_client()
    _, cursor = follow(first)
    second = on_file(database).test_client()
    make_car(second)
    book(first, 1)
    changes, cursor = follow(on_file(database).test_client(), since=cursor)  # a restart
    assert [(c["type"], c["action"]) for c in changes] == [("car", "created"), ("booking", "created")]
    assert follow(first, since=cursor)[0] == []


def rebuild(changes, records):
    for change in changes:
        kind = records.setdefault(change["type"], {})
        if change["record"] is None:
            kind.pop(change["id"], None)
        else:
            kind[change["id"]] = change["record"]


def collections(client):
    """Every record a client can read, as the feed names them."""
    found = {"dealer": {d["id"]: d for d in client.get(f"{API}/dealers").get_json()},
             "car": {c["id"]: c for c in client.get(f"{API}/cars").get_json()},
             "booking": {b["id"]: b for b in client.get(f"{API}/bookings?limit=1000").get_json()},
             "maintenance_window": {w["id"]: w for car in client.get(f"{API}/cars").get_json()
                                    for w in client.get(f"{API}/cars/{car['id']}/maintenance-windows").get_json()}}
    return found


def test_a_client_following_the_feed_rebuilds_the_stores_state(database):
    """Random writes through two apps, the feed followed in random pages along the way and through
    a third: the records it rebuilds are the collections' answer, holds included."""
    rng = random.Random(24)
    apps = [on_file(database).test_client(), on_file(database).test_client()]
    records, cursor = {}, None
    day = lambda n: f"2035-03-{n:02d}T10:00:00Z"  # noqa: E731
    for step in range(300):
        client = rng.choice(apps)
        action = rng.random()
        cars = list(collections(client)["car"])
        if action < 0.1 or not cars:
            client.post(f"{API}/cars", json=car_body(vin=vin(step), dealer_id=rng.choice([1, 1, 2])))
        elif action < 0.15:
            client.post(f"{API}/dealers", json={"name": f"Dealer {step}"})
        elif action < 0.2:
            client.patch(f"{API}/cars/{rng.choice(cars)}", json={"color": f"Color {step}"})
        elif action < 0.45:
            start = rng.randint(1, 27)
            book(client, rng.choice(cars), day(start), day(start + rng.randint(1, 2)))
        elif action < 0.55:
            bookings = client.get(f"{API}/bookings?limit=1000").get_json()
            if bookings:
                client.patch(f"{API}/bookings/{rng.choice(bookings)['id']}", json={"customer_name": f"N{step}"})
        elif action < 0.65:
            bookings = client.get(f"{API}/bookings?limit=1000").get_json()
            if bookings:
                client.delete(f"{API}/bookings/{rng.choice(bookings)['id']}")
        elif action < 0.72:
            start = rng.randint(1, 27)
            open_window(client, rng.choice(cars), day(start), day(start + 1))
        elif action < 0.8:
            start = rng.randint(1, 27)
            made = hold(client, rng.choice(cars), day(start), day(start + 1))
            if made.status_code == 201 and rng.random() < 0.5:
                client.post(f"{API}/holds/{made.get_json()['id']}/confirm", json=CUSTOMER)
        elif action < 0.85:
            car = rng.choice(cars)
            client.delete(f"{API}/cars/{car}")
        elif action < 0.9:
            client.patch(f"{API}/dealers/1", json={"location": f"Place {step}"})
        else:
            changes, cursor = follow(rng.choice(apps), since=cursor, limit=rng.choice([1, 3, 50]))
            rebuild(changes, records)
    changes, cursor = follow(on_file(database).test_client(), since=cursor, limit=7)
    rebuild(changes, records)
    expected = collections(apps[0])
    for kind in ("dealer", "car", "booking", "maintenance_window"):
        assert records.get(kind, {}) == expected[kind], kind
    assert len(expected["booking"]) > 10 and len(expected["maintenance_window"]) > 3
    for hold_id, record in records.get("hold", {}).items():  # the holds not confirmed or let go: still there
        assert apps[1].get(f"{API}/holds/{hold_id}").get_json() == record


def test_the_docs_state_the_new_headers_and_never_fill_in_one_key_for_every_operation(client):
    """The docs page fills each parameter's example into its form: one key for every operation would
    make the second a 422."""
    paths = client.get("/openapi.json").get_json()["paths"]
    for path, operations in paths.items():
        for method, op in operations.items():
            headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
            if method in ("post", "put", "patch"):
                assert "example" not in headers["Idempotency-Key"] and "Idempotent-Replayed" in \
                    op["responses"][next(code for code in op["responses"] if code.startswith("2"))]["headers"], path
                assert {"409", "422"} <= set(op["responses"]), path
    single = f"{API}/bookings/{{booking_id}}"
    assert "If-None-Match" in [p["name"] for p in paths[single]["get"]["parameters"]]
    assert "304" in paths[single]["get"]["responses"] and "ETag" in paths[single]["get"]["responses"]["200"]["headers"]
    for method in ("patch", "delete"):
        assert "If-Match" in [p["name"] for p in paths[single][method]["parameters"]]
        assert "412" in paths[single][method]["responses"]
    assert "410" in paths[f"{API}/changes"]["get"]["responses"] and "410" in paths[f"{API}/holds/{{hold_id}}/confirm"]["post"]["responses"]


def test_a_follower_polling_while_two_apps_write_at_once_sees_every_change_once(database):
    """Writers on two apps (two processes) commit at once while a follower polls the feed in small
    pages: what it gathered is, change for change, the whole log read afterwards. On PostgreSQL a
    transaction's changes are numbered as it commits, so none can appear behind a cursor already given."""
    apps = [on_file(database), on_file(database)]
    for n in range(1, 9):
        make_car(apps[0].test_client(), vin=vin(n))
    start_cursor = follow(apps[0].test_client())[1]
    stop = threading.Event()
    seen, errors = [], []

    def writer(i):
        client, rng = apps[i % 2].test_client(), random.Random(i)
        for k in range(40):
            day = rng.randint(1, 28)
            response = book(client, i % 8 + 1, f"2035-05-{day:02d}T{i:02d}:00:00Z", f"2035-05-{day:02d}T{i:02d}:30:00Z")
            if response.status_code == 201 and rng.random() < 0.3:
                client.delete(f"{API}/bookings/{response.get_json()['id']}")

    def follower():
        client, cursor = apps[1].test_client(), start_cursor
        while not stop.is_set():
            response = client.get(f"{API}/changes", query_string={"since": cursor, "limit": 3})
            if response.status_code != 200:
                errors.append(response.get_json())
                return
            page = response.get_json()
            seen.extend(page["changes"])
            cursor = page["next"]
        seen.extend(follow(client, since=cursor)[0])

    watching = threading.Thread(target=follower)
    watching.start()
    run_at_once(8, writer)
    stop.set()
    watching.join(timeout=60)
    assert not errors
    whole = follow(apps[0].test_client(), since=start_cursor)[0]
    assert len(whole) > 100
    assert [c["cursor"] for c in seen] == [c["cursor"] for c in whole]
    assert seen == whole


# ---------------------------------------------------------------------------------------------
# Keys per role and dealer, and the history of every change
# ---------------------------------------------------------------------------------------------

def make_key(app, role, dealer=None, note=""):
    """A key made with the CLI, as an operator would: (its id, the key to send)."""
    args = ["keys", "add", "--role", role] + (["--dealer", str(dealer)] if dealer else []) + ["--note", note]
    result = app.test_cli_runner().invoke(args=args)
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()  # the key alone on standard output; what it is on standard error
    return key.split(".")[0], key


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


class World:
    """Two dealers' fleets and a key of each role: `admin`; `staff` of dealer 1 and `other_staff` of
    dealer 2; `booker` (which made booking 1 and hold 1, on dealer 1's car 1) and `other_booker`.
    Dealer 3 has no cars; car 3 (dealer 1) has nothing on it."""
    ROLES = ("admin", "staff", "other_staff", "booker", "other_booker")

    def __init__(self, app):
        self.app, self.client = app, app.test_client()
        self.keys = {"admin": make_key(app, "admin")[1], "staff": make_key(app, "staff", 1)[1],
                     "booker": make_key(app, "booking")[1], "other_booker": make_key(app, "booking")[1]}
        admin = bearer(self.keys["admin"])
        for name in ("North", "Empty"):
            assert self.client.post(f"{API}/dealers", json={"name": name}, headers=admin).status_code == 201
        self.keys["other_staff"] = make_key(app, "staff", 2)[1]
        for n, dealer in ((1, 1), (2, 2), (3, 1)):
            assert self.client.post(f"{API}/cars", json=car_body(vin=vin(n), dealer_id=dealer),
                                    headers=admin).status_code == 201
        assert self.client.post(f"{API}/bookings", json=booking_body(1), headers=self.as_("booker")).status_code == 201
        assert self.client.post(f"{API}/bookings", json=booking_body(2), headers=admin).status_code == 201
        assert self.client.post(f"{API}/cars/1/maintenance-windows", headers=admin,
                                json=window("2035-02-01T08:00:00Z", "2035-02-01T12:00:00Z")).status_code == 201
        assert self.client.post(f"{API}/holds", headers=self.as_("booker"), json={
            "car_id": 1, "start_datetime": "2035-03-01T10:00:00Z", "end_datetime": "2035-03-01T12:00:00Z"}
        ).status_code == 201

    def as_(self, role):
        return bearer(self.keys[role])

    def stored(self):
        fleet = self.app.extensions["dealership"].fleet
        return {name: dict(getattr(fleet, name)) for name in ("dealers", "cars", "bookings", "windows", "holds")}


# (method, path, body) -> the status each key gets: admin, staff, other_staff, booker, other_booker
ROLE_TABLE = [
    ("post", "/dealers", {"name": "South"}, (201, 403, 403, 403, 403)),
    ("patch", "/dealers/2", {"location": "Kiel"}, (200, 403, 403, 403, 403)),
    ("delete", "/dealers/3", None, (204, 403, 403, 403, 403)),
    ("post", "/cars", car_body(vin=vin(9), dealer_id=1), (201, 201, 403, 403, 403)),
    ("put", "/cars/1", {"color": "Red"}, (200, 200, 403, 403, 403)),
    ("patch", "/cars/1", {"color": "Red"}, (200, 200, 403, 403, 403)),
    ("delete", "/cars/3", None, (204, 204, 403, 403, 403)),
    ("post", "/cars/1/maintenance-windows", window("2035-04-01T08:00:00Z", "2035-04-01T12:00:00Z"),
     (201, 201, 403, 403, 403)),
    ("delete", "/cars/1/maintenance-windows/1", None, (204, 204, 403, 403, 403)),
    ("get", "/cars/1/history", None, (200, 200, 403, 403, 403)),
    ("post", "/bookings", booking_body(1, "2035-05-01T10:00:00Z", "2035-05-01T12:00:00Z"), (201, 201, 403, 201, 201)),
    ("get", "/bookings", None, (200, 200, 200, 200, 200)),
    ("get", "/bookings/1", None, (200, 200, 404, 200, 404)),
    ("patch", "/bookings/1", {"customer_name": "Grace Hopper"}, (200, 200, 404, 200, 404)),
    ("delete", "/bookings/1", None, (204, 204, 404, 204, 404)),
    ("get", "/bookings/1/history", None, (200, 200, 404, 200, 404)),
    ("post", "/holds", {"car_id": 1, "start_datetime": "2035-06-01T10:00:00Z", "end_datetime": "2035-06-01T12:00:00Z"},
     (201, 201, 403, 201, 201)),
    ("delete", "/holds/1", None, (204, 204, 403, 204, 403)),
    ("post", "/holds/1/confirm", CUSTOMER, (201, 201, 403, 201, 403)),
    ("get", "/changes", None, (200, 403, 403, 403, 403)),
]


@pytest.mark.parametrize("target_engine", ENGINES)
def test_copy_to_takes_the_keys_along(tmp_path, request, target_engine):
    source = on_file(str(tmp_path / "source.sqlite3"))
    _, admin = make_key(source, "admin", note="owner")
    revoked_id, revoked = make_key(source, "booking")
    assert source.test_cli_runner().invoke(args=["keys", "revoke", revoked_id]).exit_code == 0
    target = request.getfixturevalue("postgres_database") if target_engine == "postgresql" else \
        str(tmp_path / "target.sqlite3")
    result = source.test_cli_runner().invoke(args=["copy-to", target])
    assert result.exit_code == 0 and "and 2 API keys from" in result.output, result.output
    moved = on_file(target)
    client = moved.test_client()
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer(admin)).status_code == 201
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2)), headers=bearer(revoked)), 401)
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2))), 401)
    assert make_key(moved, "staff", 1)[0] == "3"
    listed = moved.test_cli_runner().invoke(args=["keys", "list"]).output
    assert "owner" in listed and listed.count("\n") == 4


def test_the_role_table_names_every_write_and_every_personal_read(app):
    """A new route that writes or reads customers' data without a row here fails this test."""
    guarded = {(method.lower(), re.sub(r"<digits:\w+>", "N", rule.rule[len(API):]))
               for rule in app.url_map.iter_rules() if rule.endpoint.startswith("dealership.")
               for method in rule.methods - {"HEAD", "OPTIONS"}
               if dealership.needs_key(method, app.view_functions[rule.endpoint])}
    assert {(method, re.sub(r"/\d+", "/N", path)) for method, path, _, _ in ROLE_TABLE} == guarded


@pytest.mark.parametrize("method, path, body, statuses", ROLE_TABLE, ids=[f"{m} {p}" for m, p, _, _ in ROLE_TABLE])
def test_each_role_against_each_write_and_personal_read(method, path, body, statuses):
    for role, status in zip(World.ROLES, statuses):
        world = World(new_app())
        before = world.stored()
        response = getattr(world.client, method)(API + path, json=body, headers=world.as_(role))
        assert response.status_code == status, (role, response.get_json())
        if status >= 400:
            problem = assert_problem(response, status)
            assert world.stored() == before, role  # a refusal changes nothing
            if status == 404:  # the same words as a booking that does not exist
                assert problem["detail"] == "There is no booking with id 1."
            else:
                assert "needs" in problem["detail"], problem
        for refused in ({}, bearer("1.not-the-secret"), bearer(world.keys[role] + "x")):
            assert_problem(getattr(world.client, method)(API + path, json=body, headers=refused), 401)


def test_a_403_says_which_role_or_dealer_the_action_needs():
    world = World(new_app())
    body = assert_problem(world.client.patch(f"{API}/cars/1", json={"color": "Red"}, headers=world.as_("other_staff")),
                          403)
    assert "Car 1 is dealer 1's" in body["detail"] and "a staff key of dealer 1" in body["detail"]
    body = assert_problem(world.client.post(f"{API}/dealers", json={"name": "X"}, headers=world.as_("staff")), 403)
    assert "This needs a key of role admin" in body["detail"] and "staff" in body["detail"]
    body = assert_problem(world.client.post(f"{API}/cars", json=car_body(vin=vin(8), dealer_id=2),
                                            headers=world.as_("staff")), 403)
    assert "only at dealer 1, not at dealer 2" in body["detail"]
    body = assert_problem(world.client.patch(f"{API}/cars/1", json={"dealer_id": 2}, headers=world.as_("staff")), 403)
    assert "not at dealer 2" in body["detail"] and world.client.get(f"{API}/cars/1").get_json()["dealer_id"] == 1
    body = assert_problem(world.client.delete(f"{API}/holds/1", headers=world.as_("other_booker")), 403)
    assert "made by another key" in body["detail"]
    # moving a booking to another dealer's car: a staff key may not; a booking key may book any car
    assert_problem(world.client.patch(f"{API}/bookings/1", json={"car_id": 2}, headers=world.as_("staff")), 403)
    moved = world.client.patch(f"{API}/bookings/1", json={"car_id": 2, "start_datetime": "2035-07-01T10:00:00Z",
                                                          "end_datetime": "2035-07-01T12:00:00Z"},
                               headers=world.as_("booker"))
    assert moved.status_code == 200 and moved.get_json()["car_id"] == 2


def test_another_dealers_booking_is_a_404_even_before_its_body_is_judged():
    world = World(new_app())
    for body in ({"customer_email": "not-an-address"}, {"start_datetime": "yesterday"}):
        problem = assert_problem(world.client.patch(f"{API}/bookings/1", json=body, headers=world.as_("other_staff")),
                                 404)
        assert problem["detail"] == "There is no booking with id 1."
    assert_problem(world.client.post(f"{API}/holds/1/confirm", json={}, headers=world.as_("other_staff")), 403)


def test_listing_bookings_lists_only_what_the_key_may_see_and_counts_only_those():
    world = World(new_app())
    admin = world.as_("admin")
    world.client.post(f"{API}/bookings", json=booking_body(3, "2035-05-01T10:00:00Z", "2035-05-01T12:00:00Z"),
                      headers=world.as_("staff"))  # booking 3, dealer 1's car 3
    world.client.post(f"{API}/bookings", json=booking_body(2, "2035-05-01T10:00:00Z", "2035-05-01T12:00:00Z"),
                      headers=world.as_("other_booker"))  # booking 4, dealer 2's car 2
    expected = {"admin": [1, 2, 3, 4], "staff": [1, 3], "other_staff": [2, 4], "booker": [1], "other_booker": [4]}
    for role, ids in expected.items():
        response = world.client.get(f"{API}/bookings", headers=world.as_(role))
        assert [b["id"] for b in response.get_json()] == ids, role
        assert response.headers["X-Total-Count"] == str(len(ids))
        paged = world.client.get(f"{API}/bookings?limit=1&offset=1", headers=world.as_(role))
        assert [b["id"] for b in paged.get_json()] == ids[1:2] and paged.headers["X-Total-Count"] == str(len(ids))
        for query in ("car_id=1", "customer_email=ada@example.com", "start_datetime=2035-01-01T00:00:00Z",
                      "end_datetime=2035-12-31T00:00:00Z"):
            found = world.client.get(f"{API}/bookings?{query}", headers=world.as_(role)).get_json()
            everything = world.client.get(f"{API}/bookings?{query}", headers=admin).get_json()
            assert [b["id"] for b in found] == [b["id"] for b in everything if b["id"] in ids], (role, query)


def test_a_booking_key_sees_the_booking_its_hold_became_even_when_staff_confirmed_it():
    world = World(new_app())
    confirmed = world.client.post(f"{API}/holds/1/confirm", json=CUSTOMER, headers=world.as_("staff"))
    assert confirmed.status_code == 201
    booking_id = confirmed.get_json()["id"]
    assert world.client.get(f"{API}/bookings/{booking_id}", headers=world.as_("booker")).status_code == 200
    assert_problem(world.client.get(f"{API}/bookings/{booking_id}", headers=world.as_("other_booker")), 404)


def test_keys_from_the_cli_are_stored_hashed_listed_without_the_secret_and_never_logged(sqlite_file, caplog):
    app = on_file(sqlite_file)
    with caplog.at_level("DEBUG"):
        key_id, key = make_key(app, "staff", 1, note="front desk")
        client = app.test_client()
        assert client.post(f"{API}/cars", json=car_body(), headers=bearer(key)).status_code == 201
    secret = key.split(".", 1)[1]
    assert len(secret) >= 43 and re.fullmatch(r"[A-Za-z0-9_-]+", secret)  # 32 random bytes, URL-safe
    rows = sql(sqlite_file, "SELECT * FROM api_keys")
    assert len(rows) == 1 and secret not in str(rows) and key not in str(rows)
    assert sql(sqlite_file, "SELECT secret_hash FROM api_keys")[0][0] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in caplog.text
    listed = app.test_cli_runner().invoke(args=["keys", "list"]).output
    assert "front desk" in listed and "staff" in listed and secret not in listed
    assert listed.splitlines()[1].split("\t")[:3] == [key_id, "staff", "1"]
    assert listed.splitlines()[1].split("\t")[4] != "-"  # last used
    for args, message in [(["keys", "add", "--role", "staff"], "--dealer is needed"),
                          (["keys", "add", "--role", "booking", "--dealer", "1"], "only for one"),
                          (["keys", "add", "--role", "staff", "--dealer", "9"], "no dealer with id 9"),
                          (["keys", "add", "--role", "owner"], "Invalid value"),
                          (["keys", "revoke", "7"], "no key 7 in force")]:
        result = app.test_cli_runner().invoke(args=args)
        assert result.exit_code != 0 and message in result.output, result.output
    assert len(sql(sqlite_file, "SELECT * FROM api_keys")) == 1


def test_keys_are_compared_in_constant_time(monkeypatch):
    app = new_app()
    _, key = make_key(app, "admin")
    compared = []
    real = dealership.hmac.compare_digest
    monkeypatch.setattr(dealership.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    client = app.test_client()
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer(key)).status_code == 201
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(3)), headers=bearer(key[:-1] + "x")), 401)
    assert len(compared) >= 2 and all(len(a) == len(b) == 64 for a, b in compared)


def test_revoking_a_key_ends_it_at_once_through_every_app(database):
    first, second = on_file(database), on_file(database)
    key_id, key = make_key(first, "admin")
    for app in (first, second):
        assert app.test_client().post(f"{API}/dealers", json={"name": "X"}, headers=bearer(key)).status_code == 201
    result = second.test_cli_runner().invoke(args=["keys", "revoke", key_id])
    assert result.exit_code == 0 and f"Key {key_id} revoked" in result.output
    for app in (first, second):
        client = app.test_client()
        before = client.get(f"{API}/dealers").get_json()
        assert_problem(client.post(f"{API}/dealers", json={"name": "Y"}, headers=bearer(key)), 401)
        assert_problem(client.get(f"{API}/bookings", headers=bearer(key)), 401)
        assert client.get(f"{API}/dealers").get_json() == before
    assert "revoked" not in second.test_cli_runner().invoke(args=["keys", "revoke", key_id]).output.lower().replace(
        "no key", "")


def test_an_open_service_stays_open_until_a_key_is_made_then_every_write_needs_one(database):
    app = on_file(database)
    client = app.test_client()
    make_car(client)  # open, as before
    assert client.get(f"{API}/bookings").status_code == 200
    other = on_file(database)  # a process already running when the key is made
    _, key = make_key(app, "booking")
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2))), 401)
    assert_problem(client.get(f"{API}/bookings"), 401)
    assert client.get(f"{API}/cars").status_code == 200  # public reads stay open
    other.extensions["dealership"].keys_checked = float("-inf")  # as a second later
    assert_problem(other.test_client().post(f"{API}/cars", json=car_body(vin=vin(2))), 401)
    assert_problem(client.post(f"{API}/cars", json=car_body(vin=vin(2)), headers=bearer(key)), 403)


def test_the_configured_key_is_an_admin_key_beside_the_stored_ones():
    app = new_app({"DEALERSHIP_API_KEY": "s3cret-key-for-tests"})
    client = app.test_client()
    _, staff = make_key(app, "staff", 1)
    assert client.post(f"{API}/dealers", json={"name": "X"}, headers=bearer("s3cret-key-for-tests")).status_code == 201
    assert_problem(client.post(f"{API}/dealers", json={"name": "Y"}, headers=bearer(staff)), 403)
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer(staff)).status_code == 201


def history(client, path, headers):
    response = client.get(f"{API}{path}/history", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_a_bookings_history_says_who_did_what_when_in_order_through_two_apps(database):
    first, second = on_file(database), on_file(database)
    admin_id, admin = make_key(first, "admin")
    booker_id, booker = make_key(first, "booking")
    staff_id, staff = make_key(first, "staff", 1)
    for n in (1, 2):
        assert first.test_client().post(f"{API}/cars", json=car_body(vin=vin(n)), headers=bearer(admin)).status_code == 201
    one, two = first.test_client(), second.test_client()
    made = one.post(f"{API}/bookings", json=booking_body(1), headers=bearer(booker) | {"X-Request-ID": "req-made"})
    assert made.status_code == 201
    assert two.patch(f"{API}/bookings/1", json={"customer_name": "Grace Hopper"},
                     headers=bearer(staff) | {"X-Request-ID": "req-renamed"}).status_code == 200
    assert one.patch(f"{API}/bookings/1", json={"car_id": 2, "end_datetime": "2035-01-15T14:00:00Z"},
                     headers=bearer(booker) | {"X-Request-ID": "req-moved"}).status_code == 200
    assert two.delete(f"{API}/bookings/1", headers=bearer(admin) | {"X-Request-ID": "req-cancelled"}).status_code == 204
    assert_problem(one.get(f"{API}/bookings/1", headers=bearer(admin)), 404)
    for client in (one, two):
        entries = history(client, "/bookings/1", bearer(admin))
        assert [(e["action"], e["key"], e["request_id"]) for e in entries] == [
            ("created", booker_id, "req-made"), ("changed", staff_id, "req-renamed"),
            ("changed", booker_id, "req-moved"), ("deleted", admin_id, "req-cancelled")]
        created, renamed, moved, cancelled = (e["fields"] for e in entries)
        assert created["customer_name"] == {"before": None, "after": "Ada Lovelace"}
        assert created["start_datetime"] == {"before": None, "after": "2035-01-15T10:00:00+00:00"}
        assert renamed == {"customer_name": {"before": "Ada Lovelace", "after": "Grace Hopper"}}
        assert moved["car_id"] == {"before": 1, "after": 2}
        assert moved["end_datetime"] == {"before": "2035-01-15T12:00:00+00:00", "after": "2035-01-15T14:00:00+00:00"}
        assert "customer_name" not in moved
        assert cancelled["customer_name"] == {"before": "Grace Hopper", "after": None}
        assert [e["at"] for e in entries] == sorted(e["at"] for e in entries)
    # after the cancellation: the booking key that made it may still read its history, another may not
    assert len(history(one, "/bookings/1", bearer(booker))) == 4
    _, stranger = make_key(first, "booking")
    assert_problem(one.get(f"{API}/bookings/1/history", headers=bearer(stranger)), 404)
    assert_problem(one.get(f"{API}/bookings/99/history", headers=bearer(admin)), 404)


def test_a_cars_history_and_the_open_and_configured_writers():
    app = new_app({"DEALERSHIP_API_KEY": "s3cret-key-for-tests"})
    client = app.test_client()
    configured = bearer("s3cret-key-for-tests")
    assert client.post(f"{API}/cars", json=car_body(), headers=configured).status_code == 201
    assert client.patch(f"{API}/cars/1", json={"daily_price": 120}, headers=configured).status_code == 200
    entries = history(client, "/cars/1", configured)
    assert [(e["action"], e["key"]) for e in entries] == [("created", "configuration"), ("changed", "configuration")]
    assert entries[1]["fields"] == {"daily_price": {"before": 100.0, "after": 120.0}}
    assert client.delete(f"{API}/cars/1", headers=configured).status_code == 204
    assert [e["action"] for e in history(client, "/cars/1", configured)][-1] == "deleted"
    open_client = new_app().test_client()
    make_car(open_client)
    assert [e["key"] for e in history(open_client, "/cars/1", {})] == ["open"]
    assert history(open_client, "/cars/1", {})[0]["request_id"]


def test_history_is_kept_for_the_days_set_then_pruned(database, monkeypatch):
    monkeypatch.setattr(dealership, "CHANGE_LOG_KEEP", 5)
    monkeypatch.setattr(dealership, "CHANGE_LOG_PRUNE_EVERY", 5)
    app = on_file(database, DEALERSHIP_HISTORY_DAYS=30)
    client = app.test_client()
    make_car(client)
    for n in range(12):  # far more changes than CHANGE_LOG_KEEP, all within the 30 days: all kept
        assert client.patch(f"{API}/cars/1", json={"daily_price": 100 + n}).status_code == 200
    assert len(history(client, "/cars/1", {})) == 13
    # the changes so far as if made 31 days ago: the next pruning forgets them, and keeps the newest
    sql(database, "UPDATE changes SET at = ?", (datetime.now(timezone.utc) - timedelta(days=31),))
    for n in range(10):
        client.post(f"{API}/dealers", json={"name": f"Dealer {n}"})
    assert history(client, "/cars/1", {}) == []
    assert client.get(f"{API}/cars/1").status_code == 200
    assert len(history(client, "/cars/1", {})) == 0
    assert client.patch(f"{API}/cars/1", json={"color": "Red"}).status_code == 200
    only, = history(client, "/cars/1", {})  # what came before it is forgotten: each field as it now is
    assert only["fields"]["color"] == {"before": None, "after": "Red"} and only["fields"]["daily_price"]["after"] == 111
    assert all(change["before"] is None for change in only["fields"].values())


def test_history_days_is_a_setting():
    assert new_app().config["DEALERSHIP_HISTORY_DAYS"] == 365
    for value in ("-1", "1.5", "36526", "99999999"):
        with pytest.raises(dealership.ConfigError, match="DEALERSHIP_HISTORY_DAYS"):
            new_app({"DEALERSHIP_HISTORY_DAYS": value})
    assert new_app({"DEALERSHIP_HISTORY_DAYS": "36525"}).config["DEALERSHIP_HISTORY_DAYS"] == 36525


def test_the_openapi_document_states_the_roles_of_each_operation_that_needs_a_key():
    app = new_app()
    client = app.test_client()
    document = client.get("/openapi.json").get_json()
    assert "securitySchemes" not in document.get("components", {})  # open: nothing to authorize with
    operations = {(method, path): op for path, ops in document["paths"].items() for method, op in ops.items()}
    assert operations[("post", f"{API}/dealers")]["x-roles"] == ["admin"]
    assert operations[("delete", f"{API}/cars/{{car_id}}")]["x-roles"] == ["admin", "staff"]
    assert operations[("get", f"{API}/bookings/{{booking_id}}/history")]["x-roles"] == ["admin", "staff", "booking"]
    assert operations[("get", f"{API}/changes")]["x-roles"] == ["admin"]
    assert "Keys: admin or staff; a staff key only for its dealer's cars." in \
        operations[("patch", f"{API}/cars/{{car_id}}")]["description"]
    for (method, path), op in operations.items():
        assert ("x-roles" in op) == ("401" in op["responses"]) == ("403" in op["responses"]), (method, path)
    assert "x-roles" not in operations[("get", f"{API}/cars")]
    make_key(app, "admin")
    secured = client.get("/openapi.json").get_json()  # keys in force: the operations declare bearer auth
    assert secured["paths"][f"{API}/dealers"]["post"]["security"] == [{"bearer": []}]


def test_odd_key_ids_and_history_ids_are_refused_cleanly():
    world = World(new_app())
    secret = world.keys["booker"].split(".", 1)[1]
    key_id = world.keys["booker"].split(".")[0]
    for odd in (f"0{key_id}.{secret}", f"\u00b2.{secret}", f"+{key_id}.{secret}", f"{key_id}", f"{key_id}.",
                "99999999999999999999." + secret):
        response = world.client.get(f"{API}/bookings", environ_base={"HTTP_AUTHORIZATION": f"Bearer {odd}"})
        assert_problem(response, 401)
    for path in ("/bookings/9223372036854775808/history", "/cars/99999999999999999999/history"):
        assert_problem(world.client.get(API + path, headers=world.as_("admin")), 404)


def test_a_cancelled_bookings_history_stays_with_the_dealer_its_car_was_at():
    world = World(new_app())
    assert world.client.delete(f"{API}/bookings/1", headers=world.as_("booker")).status_code == 204
    assert world.client.delete(f"{API}/holds/1", headers=world.as_("booker")).status_code == 204
    assert world.client.delete(f"{API}/cars/1/maintenance-windows/1", headers=world.as_("admin")).status_code == 204
    assert world.client.patch(f"{API}/cars/1", json={"dealer_id": 2}, headers=world.as_("admin")).status_code == 200
    assert_problem(world.client.get(f"{API}/bookings/1/history", headers=world.as_("other_staff")), 404)
    assert len(history(world.client, "/bookings/1", world.as_("staff"))) == 2
    assert len(history(world.client, "/bookings/1", world.as_("booker"))) == 2


def test_each_api_keys_idempotency_keys_are_its_own():
    world = World(new_app())
    retry = {"Idempotency-Key": "k1"}
    first = world.client.patch(f"{API}/bookings/1", json={"customer_name": "Z"}, headers=world.as_("admin") | retry)
    assert first.status_code == 200
    other = world.client.patch(f"{API}/bookings/1", json={"customer_name": "Z"}, headers=world.as_("other_staff") | retry)
    assert_problem(other, 404)  # its own request, judged as such: not a 422 that tells the key was used
    again = world.client.post(f"{API}/bookings", json=booking_body(3), headers=world.as_("staff") | retry)
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers


def test_the_keys_commands_refuse_what_they_cannot_use():
    app = new_app()
    runner = app.test_cli_runner()
    for args in (["keys", "revoke", "99999999999999999999"], ["keys", "add", "--role", "admin", "--note", "a\tb"],
                 ["keys", "add", "--role", "admin", "--note", "x" * 201]):
        result = runner.invoke(args=args)
        assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit), args
    assert "1\tadmin" not in runner.invoke(args=["keys", "list"]).output


def test_while_the_database_cannot_be_read_reads_go_on_with_the_keys_last_read(tmp_path, monkeypatch):
    def unreadable():
        raise sqlite3.OperationalError("disk I/O error")

    keyed = on_file(str(tmp_path / "keyed.sqlite3"))
    client, store = keyed.test_client(), keyed.extensions["dealership"]
    _, seen = make_key(keyed, "admin")
    _, unseen = make_key(keyed, "admin")
    assert client.post(f"{API}/cars", json=car_body(), headers=bearer(seen)).status_code == 201
    assert client.post(f"{API}/bookings", json=booking_body(1), headers=bearer(seen)).status_code == 201
    monkeypatch.setattr(store.engine, "reader", unreadable)
    assert [b["id"] for b in client.get(f"{API}/bookings", headers=bearer(seen)).get_json()] == [1]
    assert_problem(client.get(f"{API}/bookings", headers=bearer(unseen)), 503)  # never read: cannot be checked
    assert_problem(client.get(f"{API}/bookings"), 401)

    open_app = on_file(str(tmp_path / "open.sqlite3"))  # an open service stays open to reads meanwhile
    make_car(open_app.test_client())
    book(open_app.test_client(), 1)
    open_store = open_app.extensions["dealership"]
    monkeypatch.setattr(open_store.engine, "reader", unreadable)
    open_store.keys_checked = float("-inf")  # it looks again for keys, and cannot
    assert [b["id"] for b in open_app.test_client().get(f"{API}/bookings").get_json()] == [1]
