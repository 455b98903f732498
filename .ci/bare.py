"""The bare floor of the throughput benchmark: a Flask app that answers the service's own bodies as
ready bytes, for the same requests, so that `service / bare` is what the service costs on top of
Flask and the HTTP server. Its bodies come from the JSON file that DEALERSHIP_BARE_BODIES names
(written by .ci/throughput.py from the running service); served by the very same server command.
"""
import json
import os

from flask import Flask, Response, request


def create_app():
    with open(os.environ["DEALERSHIP_BARE_BODIES"]) as f:
        bodies = json.load(f)
    cars = {int(car_id): body.encode() for car_id, body in bodies["cars"].items()}
    available, booked = bodies["available"].encode(), bodies["booked"].encode()
    app = Flask("bare")

    @app.get("/api/v1/cars/<int:car_id>")
    def car(car_id):
        return Response(cars[car_id], mimetype="application/json")

    @app.get("/api/v1/bookings/available-cars")
    def available_cars():
        return Response(available, mimetype="application/json")

    @app.post("/api/v1/bookings")
    def book():
        request.get_json()  # read and parse the body, as the service does
        return Response(booked, 201, mimetype="application/json")

    @app.get("/health")
    def health():
        return Response(b'{"status":"ok"}\n', mimetype="application/json")

    return app
