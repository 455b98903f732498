#!/usr/bin/env python3
"""Abuse test: what a hostile client can do to `flask --app dealership serve`, on 127.0.0.1 only.

    python .ci/abuse.py

Starts the service's own production command on a free loopback port, with its temporary folder
(where waitress spools large bodies) in a folder of its own, and shows, bounded in time and count:
1. 150 idle connections (connected, sending nothing) do not stop a fresh client from being answered
   within 1 s;
2. 60 connections that send one header line every 2 s do not either, nor 60 that send a body one
   byte every 2 s (a server that hands a request to a thread before its body is in would be locked);
3. a 64 MiB chunked body to POST /api/v1/cars is refused (413, or the connection closed) without
   more than the service's body limit reaching the disk: the server's files in the spool folder
   (deleted ones too, through /proc) are watched throughout;
4. 2,000 requests with bodies nested from 1 to 100,000 deep, arrays and objects, give no 5xx;
5. calendar feeds are bounded: a feed of the years 2000 to 9998 is a 422, a repeat with its ETag a
   304, and 32 feed requests at once do not keep a fresh client waiting more than 2 s;
6. 12 connections that ask for the whole fleet (over 1 MiB) with a tiny receive window and never
   read make the server spool nothing to disk, and a fresh client is still answered within 1 s;
7. behind a trusted proxy (DEALERSHIP_PROXIES=1, an API key): one client's wrong keys, until it is
   throttled (429), do not throttle another client's right key, nor its own right key.
Every socket has a timeout, the run has a deadline, and the server is stopped however this exits.
Nothing is left in the temporary folder unless the check fails: then the server log is kept and its
path printed.
"""
import http.client
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

from serve import HOST, run, serve, verdict

LIMIT = 1024 * 1024  # DEALERSHIP_MAX_CONTENT_LENGTH's default, which serve passes on to waitress


def fresh_client_seconds(port):
    """How long a new client waits for /health (at most 10 s)."""
    began = time.monotonic()
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/health")
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return float("inf")
    finally:
        conn.close()
    return time.monotonic() - began if status == 200 else float("inf")


def open_idle(port, count):
    sockets = []
    for _ in range(count):
        s = socket.create_connection((HOST, port), timeout=5)
        sockets.append(s)
    return sockets


def slow_headers(port, count, stop, body=False):
    """`count` clients that start a request and then send one header line (or, with `body`, one byte
    of a 10,000-byte body) every 2 s until `stop`."""
    sockets = open_idle(port, count)
    for s in sockets:
        s.sendall(b"POST /api/v1/dealers HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 10000\r\n\r\n{" if body else b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    def drip():
        n = 0
        while not stop.wait(2):
            n += 1
            for s in sockets:
                try:
                    s.sendall(b" " if body else f"X-Slow-{n}: {n}\r\n".encode())
                except OSError:
                    pass
    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    return sockets, thread


def server_processes(pid):
    """The server's process and its workers (serve's supervisor starts one per core)."""
    found = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            found += [int(child) for child in f.read().split()]
    except OSError:
        pass
    return found


def spool_size(folder, pid):
    """Bytes in the server's files under `folder`, deleted ones included, in any of its processes:
    waitress spools a large body to an anonymous temporary file, which only a process's open
    descriptors still show (Linux)."""
    total = 0
    for process in server_processes(pid):
        fds = f"/proc/{process}/fd"
        for fd in os.listdir(fds) if os.path.isdir(fds) else ():
            try:
                if os.readlink(os.path.join(fds, fd)).startswith(folder):
                    total += os.stat(os.path.join(fds, fd)).st_size
            except OSError:
                pass
    return total


def huge_chunked_body(port, spool, pid, problems):
    """Send 64 MiB in 64 KiB chunks; watch the spool folder while doing so."""
    largest, answer = 0, None
    s = socket.create_connection((HOST, port), timeout=10)
    try:
        s.sendall(b"POST /api/v1/cars HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"[" * 65536)
        for n in range(1024):
            try:
                s.sendall(chunk)
            except OSError:
                break  # the server closed the connection: refused
            if n % 16 == 0:
                largest = max(largest, spool_size(spool, pid))
        try:
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        try:
            answer = s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError:
            answer = "connection closed"
    finally:
        s.close()
    largest = max(largest, spool_size(spool, pid))
    print(f"abuse: 64 MiB chunked body: {answer or 'connection closed'}; at most {largest:,} bytes spooled")
    if answer and "413" not in answer and "closed" not in answer:
        problems.append(f"the 64 MiB body was answered {answer!r}, not 413")
    if largest > 2 * LIMIT:
        problems.append(f"{largest:,} bytes of the 64 MiB body reached the disk")


def nested_bodies(port, problems):
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    statuses = {}
    for n in range(2000):
        depth = [1, 10, 100, 500, 980, 1000, 5000, 100_000][n % 8]
        body = ("[" * depth + "]" * depth) if n % 2 else ('{"a":' * depth + "1" + "}" * depth)
        if len(body) > LIMIT:
            body = body[:LIMIT]  # as deep as the limit lets it be, and then not valid JSON
        path = "/api/v1/cars" if n % 3 else "/api/v1/bookings"
        try:
            conn.request("POST", path, body.encode(), {"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            statuses[response.status] = statuses.get(response.status, 0) + 1
        except (OSError, http.client.HTTPException) as error:
            problems.append(f"nested body {n} (depth {depth}): {error!r}")
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.close()
    print(f"abuse: 2,000 nested bodies answered {dict(sorted(statuses.items()))}")
    if any(status >= 500 for status in statuses):
        problems.append(f"nested bodies gave 5xx: {statuses}")


def request(port, path, headers=None):
    """(status, headers by lower-case name, body) of one GET on a connection of its own."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {name.lower(): value for name, value in response.getheaders()}, response.read()
    finally:
        conn.close()


def fill_fleet(port, cars):
    """`cars` cars through the API on one connection: the whole fleet's list then passes 1 MiB."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    for n in range(cars):
        body = ('{"brand": "Toyota", "model": "Corolla", "year": 2024, "color": "White", "daily_price": 59.9, '
                f'"vin": "JTDBR32E7{n:08d}", "dealer_id": 1}}')
        conn.request("POST", "/api/v1/cars", body.encode(), {"Content-Type": "application/json"})
        conn.getresponse().read()
    conn.close()


def bounded_feeds(port, problems):
    everything = "/api/v1/calendar.ics?start_datetime=2000-01-01T00:00:00Z&end_datetime=9998-01-01T00:00:00Z"
    status, _, _ = request(port, everything)
    print(f"abuse: a feed of the years 2000 to 9998 answered {status}")
    if status != 422:
        problems.append(f"a feed of 7,998 years answered {status}, not 422")
    status, headers, _ = request(port, "/api/v1/calendar.ics")
    again, _, _ = request(port, "/api/v1/calendar.ics", {"If-None-Match": headers.get("etag", "")})
    print(f"abuse: the fleet's feed answered {status}, again with its ETag {again}")
    if (status, again) != (200, 304):
        problems.append(f"the fleet's feed and its repeat with the ETag answered {status} and {again}")
    threads = [threading.Thread(target=request, args=(port, "/api/v1/calendar.ics")) for _ in range(32)]
    for thread in threads:
        thread.start()
    waited = fresh_client_seconds(port)
    for thread in threads:
        thread.join(timeout=60)
    print(f"abuse: with 32 feed requests at once, a fresh client was answered in {waited:.3f} s")
    if waited > 2:
        problems.append(f"32 feed requests kept a fresh client waiting {waited:.1f} s")


def clients_that_never_read(port, spool, pid, problems):
    """12 connections ask for the whole fleet with a tiny receive window and read nothing."""
    stalled = []
    try:
        for _ in range(12):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(5)
            s.connect((HOST, port))
            s.sendall(b"GET /api/v1/cars HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            stalled.append(s)
        largest = 0
        for _ in range(10):
            time.sleep(0.5)
            largest = max(largest, spool_size(spool, pid))
        waited = fresh_client_seconds(port)
    finally:
        for s in stalled:
            s.close()
    print(f"abuse: 12 clients that never read the fleet's list: {largest:,} bytes spooled; a fresh client "
          f"was answered in {waited:.3f} s")
    if largest:
        problems.append(f"clients that never read made the server spool {largest:,} bytes to disk")
    if waited > 1:
        problems.append(f"12 clients that never read kept a fresh client waiting {waited:.1f} s")


def post_car(port, n, key, client):
    """POST a car as `client` (its address in X-Forwarded-For, as a proxy in front would send it)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    body = ('{"brand": "Skoda", "model": "Fabia", "year": 2024, "color": "Green", "daily_price": 39.0, '
            f'"vin": "TMBEA6NJ1L{n:07d}", "dealer_id": 1}}')
    try:
        conn.request("POST", "/api/v1/cars", body.encode(), {"Content-Type": "application/json",
                                                             "Authorization": f"Bearer {key}",
                                                             "X-Forwarded-For": client})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def guessers_behind_a_proxy(problems):
    key = "abuse-key-0123456789"
    env = {"DEALERSHIP_API_KEY": key, "DEALERSHIP_PROXIES": "1", "DEALERSHIP_REFUSED_KEY_LIMIT": "5/minute"}
    with serve(threads=4, command="serve", workers=1, env=env) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        guesses = [post_car(port, n, "wrong-key-0123456789", "203.0.113.5") for n in range(8)]
        other, own = post_car(port, 100, key, "198.51.100.7"), post_car(port, 101, key, "203.0.113.5")
    print(f"abuse: behind a proxy, one client's wrong keys answered {guesses}; another client's right key "
          f"{other}, its own right key {own}")
    if guesses[-1] != 429 or 401 not in guesses:
        problems.append(f"wrong keys from one client answered {guesses}, not 401s and then 429")
    if (other, own) != (201, 201):
        problems.append(f"the right key answered {other} (another client) and {own} (the guesser), not 201")


def main():
    problems = []
    spool = tempfile.mkdtemp(prefix="dealership-spool-")
    metrics = tempfile.mkdtemp(prefix="dealership-metrics-")  # the workers' metrics files, kept out of the spool
    try:
        with serve(threads=8, command="serve", env={"TMPDIR": spool, "PROMETHEUS_MULTIPROC_DIR": metrics}) as (base, server):
            port = int(base.rsplit(":", 1)[1])
            idle = open_idle(port, 150)
            try:
                waited = fresh_client_seconds(port)
                print(f"abuse: with 150 idle connections open, a fresh client was answered in {waited:.3f} s")
                if waited > 1:
                    problems.append(f"150 idle connections kept a fresh client waiting {waited:.1f} s")
            finally:
                for s in idle:
                    s.close()

            for what, body in (("slow-header", False), ("slow-body", True)):
                stop = threading.Event()
                slow, dripping = slow_headers(port, 60, stop, body)
                try:
                    time.sleep(5)  # two drips in
                    waited = fresh_client_seconds(port)
                    print(f"abuse: with 60 {what} clients, a fresh client was answered in {waited:.3f} s")
                    if waited > 1:
                        problems.append(f"60 {what} connections kept a fresh client waiting {waited:.1f} s")
                finally:
                    stop.set()
                    dripping.join(timeout=10)
                    for s in slow:
                        s.close()

            huge_chunked_body(port, spool, server.pid, problems)
            nested_bodies(port, problems)
            fill_fleet(port, 8000)
            bounded_feeds(port, problems)
            clients_that_never_read(port, spool, server.pid, problems)
            if fresh_client_seconds(port) > 1 or server.poll() is not None:
                problems.append("the server does not answer at the end")
        guessers_behind_a_proxy(problems)
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        shutil.rmtree(metrics, ignore_errors=True)
    return verdict("abuse", problems)


if __name__ == "__main__":
    sys.exit(run(main))
