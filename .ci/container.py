#!/usr/bin/env python3
"""The container image, for real: built from deploy/Dockerfile with podman, run, restarted on its volume, stopped.

    python .ci/container.py [--base IMAGE] [--fresh]

Needs root (podman's storage, apt-get, PostgreSQL run as its own user). Installs podman, runc,
debootstrap and systemd-analyze (and PostgreSQL for step 7) with apt-get when missing. Every server
it starts on the host's network listens on 127.0.0.1 only: the containers share the host's network (--network host) and
serve is told its address through FLASK_SERVE_HOST and FLASK_SERVE_PORT, the variables the image
reads (its own default is every address, port 8000, as usual for an image).

1. The base image: --base if given (any image with Python 3.11+ and its venv module, such as
   python:3.12-slim where a registry is reachable); else a plain Debian bookworm with python3 and
   python3-venv, made here with debootstrap (from the mirror apt uses) and `podman import`ed as
   localhost/dealership-ci-base:bookworm, kept in podman's storage for the next run and made again
   only when missing (--fresh: made again in any case, as on a new machine).
2. `podman build --format docker -f deploy/Dockerfile .` from the repository's top (the docker
   format keeps the HEALTHCHECK), with --build-arg BASE. This machine's pip settings that matter
   inside the build (an index other than the default, a certificate bundle, a timeout; never a
   file:// location) are handed to the build as secrets, as the Dockerfile says: nothing of them is
   written into the image or into a file of the repository. Then the image's configuration: a
   non-root USER, STOPSIGNAL SIGTERM, a HEALTHCHECK, the volume /data holding DEALERSHIP_DATABASE,
   `flask serve` as the command.
3. A container on a new volume: /health answers 200; `id -u` and every process in it are not
   root's; the HEALTHCHECK passes (`podman healthcheck run`) and fails against a port nobody serves;
   only the runtime requirements are installed (no pytest) and psycopg's libpq loads; over HTTP a
   dealer, a car and a booking (dates a week ahead of now) are made and the booking read back; the
   README's backup (`flask backup` into the volume, `podman cp` out) gives a SQLite file.
4. `podman stop` (the image's STOPSIGNAL, SIGTERM; SIGKILL after 30 s): the container exits with
   code 0 before the timeout, not killed, its workers logging their clean stop.
5. A new container on the same volume: the booking is there, the same body; stopped the same way.
6. deploy/compose.yaml is read (YAML) and checked for what it promises: the service built from
   deploy/Dockerfile at the repository's top, PostgreSQL as its database, healthchecks, restart
   policies, depends_on service_healthy, SIGTERM with a grace period over serve's 30 s, the port on
   loopback only. Compose itself is not run: its postgres image needs a registry.
7. The image with the compose file's settings for the service (each ${VAR:-default} at its
   default) on a real PostgreSQL standing in for the compose's postgres service: a throwaway
   Debian cluster on 127.0.0.1 with the compose file's role, password and database, reached over
   TCP with the password as in compose. /health shows the pool; a booking made is found by a new
   container; both stop cleanly.
8. deploy/dealership.service passes `systemd-analyze verify` (any warning fails), in a scratch root
   holding the host's units, this unit and a stand-in for the venv's flask.
9. The README's systemd steps, as written (sudo, venv, pip, the unit, systemctl enable --now, curl),
   in a container of the Debian base whose first process is systemd (localhost/dealership-ci-systemd,
   kept like the base), privileged so that systemd can build the unit's sandbox, on a network
   namespace of its own (port 8000 is the container's loopback), pip set up as on this machine:
   the service answers; a booking is made; `systemctl stop` ends it with success (exit 0, not
   killed), the workers logging their clean stop; started again, the booking is there; its main
   process runs as dealership with no new privileges, no capabilities, a system call filter and a
   read-only file system but for /var/lib/dealership; the README's backup as its user works.

Every command and wait is bounded in time. The containers, volumes, the built image, the
PostgreSQL cluster and the temporary folders are removed however this ends (an error, SIGTERM,
Ctrl+C); the two base images are kept. Exits non-zero on any failure.
"""
import argparse
import ast
import contextlib
import glob
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

from serve import HOST, ROOT, free_port, run, verdict

NAME = "container"
BASE_IMAGE = "localhost/dealership-ci-base:bookworm"
SUITE = "bookworm"
SYSTEMD_IMAGE = "localhost/dealership-ci-systemd:bookworm"
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
STOP_TIMEOUT = 30  # seconds podman stop waits before SIGKILL; serve promises to be gone within 30 s
START_SECONDS = 60  # for /health to answer after podman run
API = "/api/v1"
PIP_KEYS = ("index-url", "extra-index-url", "trusted-host", "cert", "timeout", "default-timeout", "proxy")


BEGAN = time.monotonic()


def say(text):
    print(f"{NAME}: [{time.monotonic() - BEGAN:5.0f} s] {text}", flush=True)


def sh(argv, timeout=120, check=True, quiet=False, **kwargs):
    """Run a command, print it, return its CompletedProcess (text output captured)."""
    if not quiet:
        say("$ " + " ".join(argv))
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              **{"stdin": subprocess.DEVNULL} | kwargs)
    except subprocess.TimeoutExpired:
        sys.exit(f"{NAME}: FAIL {argv[0]} {argv[1] if len(argv) > 1 else ''} did not end within {timeout} s")
    if check and done.returncode != 0:
        sys.stdout.write(done.stdout[-4000:])
        sys.stdout.write(done.stderr[-4000:])
        sys.exit(f"{NAME}: FAIL {' '.join(argv[:3])} ... exited with {done.returncode}")
    return done


def install_missing():
    """podman, runc and debootstrap (and systemd-analyze) from Debian's packages, if missing."""
    wanted = {"podman": "podman", "runc": "runc", "debootstrap": "debootstrap", "systemd-analyze": "systemd"}
    missing = sorted({package for tool, package in wanted.items() if shutil.which(tool) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"{NAME}: FAIL missing {', '.join(missing)}; run as root (or install them) to let this check install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-q"], timeout=300, env=env)
    sh(["apt-get", "install", "-y", "-q", *missing], timeout=600, env=env)


def podman_base_args():
    """Options every container started here needs on this kind of machine: runc as the runtime
    (crun, podman's other one, fails on its cgroups), and open-file and process limits within the
    hard limits here (podman's defaults exceed them, and runc's start then fails)."""
    return ["--runtime", shutil.which("runc"), "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


def apt_mirror():
    """The Debian mirror apt uses here (the first deb source of a main suite), or None: debootstrap's default."""
    for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        with open(path) as f:
            for stanza in f.read().split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if line and not line.startswith(("#", " ", "\t")) and ":" in line:
                        key, _, value = line.partition(":")
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and any("-" not in s for s in fields.get("suites", [])) \
                        and fields.get("uris") and fields.get("enabled", ["yes"]) != ["no"]:
                    return fields["uris"][0]
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f:
                words = [w for w in line.split() if not w.startswith("[")] if not line.lstrip().startswith("#") else []
                if len(words) >= 3 and words[0] == "deb" and "-" not in words[2]:
                    return words[1]
    return None


def ensure_base(work):
    """The Debian base image, made with debootstrap unless podman's storage has it already."""
    if sh(["podman", "image", "exists", BASE_IMAGE], check=False).returncode == 0:
        say(f"base image {BASE_IMAGE} found in podman's storage (made by an earlier run)")
        return
    root = os.path.join(work, "rootfs")
    mirror = apt_mirror()
    started = time.monotonic()
    argv = ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE, root] + ([mirror] if mirror else [])
    sh(argv, timeout=900)
    # apt's downloads and lists have no use in the image
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"):
        for path in glob.glob(os.path.join(root, pattern)):
            if os.path.isfile(path):
                os.unlink(path)
    say(f"debootstrap took {time.monotonic() - started:.0f} s")
    tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
    try:
        sh(["podman", "import", "-", BASE_IMAGE], timeout=300, stdin=tar.stdout)
    finally:
        tar.stdout.close()
        tar.wait(timeout=60)
    if tar.returncode != 0:
        sys.exit(f"{NAME}: FAIL tar of the base system exited with {tar.returncode}")
    shutil.rmtree(root, ignore_errors=True)


def pip_settings():
    """This machine's pip settings that matter on another system: ({name: value}, the certificate
    bundle's path or None). pip's own precedence: its environment variables, then its files."""
    listed = sh([sys.executable, "-m", "pip", "config", "list"], check=False, quiet=True).stdout
    found = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        scope, _, name = key.partition(".")
        if not sep or name not in PIP_KEYS:
            continue
        with contextlib.suppress(ValueError, SyntaxError):
            value = ast.literal_eval(value)
        rank = {":env:": 2, "install": 1, "global": 0}.get(scope)
        if rank is not None and rank >= found.get(name, (-1, None))[0]:
            found[name] = (rank, str(value))
    settings = {name: value for name, (_, value) in found.items()}
    if "default-timeout" in settings:
        settings.setdefault("timeout", settings.pop("default-timeout"))
    for name in ("index-url", "extra-index-url"):
        if name in settings:  # a file:// index is a folder of this machine, not there in the build
            urls = [url for url in settings[name].split() if url.startswith(("http://", "https://"))]
            settings[name] = " ".join(urls)
            if not urls:
                del settings[name]
    cert = settings.pop("cert", None)
    return settings, (cert if cert and os.path.isfile(cert) else None)


def pip_conf(work, settings, cert_there):
    """A pip.conf of `settings` (the certificate bundle at `cert_there`, if any) in `work`: its path, or None."""
    settings = settings | ({"cert": cert_there} if cert_there else {})
    if not settings:
        return None
    path = os.path.join(work, "pip.conf")
    with open(path, "w") as f:
        f.write("[global]\n" + "".join(f"{name} = {value}\n" for name, value in settings.items()))
    return path


def pip_secrets(work):
    """`podman build` options handing this machine's pip settings to the build as secrets:
    a pip.conf (read as /etc/pip.conf there) and the certificate bundle it names."""
    settings, cert = pip_settings()
    args = ["--secret", f"id=pip-cert,src={cert}"] if cert else []
    conf = pip_conf(work, settings, "/run/secrets/pip-cert" if cert else None)
    if conf:
        args += ["--secret", f"id=pip.conf,src={conf}"]
    say("pip settings handed to the build: " + (", ".join(sorted(settings) + ["cert"] * bool(cert)) or "none"))
    return args


def check_image(image, problems):
    """The built image's configuration; returns its HEALTHCHECK command."""
    info = json.loads(sh(["podman", "image", "inspect", image]).stdout)[0]
    config = info.get("Config", {})
    user = config.get("User", "")
    if user.split(":")[0] in ("", "0", "root"):
        problems.append(f"the image's USER is {user!r}: the service would run as root")
    if config.get("StopSignal") != "SIGTERM":
        problems.append(f"the image's STOPSIGNAL is {config.get('StopSignal')!r}, not SIGTERM")
    health = info.get("Healthcheck") or info.get("HealthCheck") or config.get("Healthcheck")
    if not health or not health.get("Test") or health["Test"][0] not in ("CMD", "CMD-SHELL"):
        problems.append(f"the image has no HEALTHCHECK ({health!r})")
    if "/data" not in (config.get("Volumes") or {}):
        problems.append(f"/data is not a volume of the image: {config.get('Volumes')!r}")
    env = dict(item.partition("=")[::2] for item in config.get("Env", []))
    if not env.get("DEALERSHIP_DATABASE", "").startswith("/data/"):
        problems.append(f"DEALERSHIP_DATABASE is {env.get('DEALERSHIP_DATABASE')!r}, not a file in /data")
    command = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
    if command[:1] != ["flask"] or "serve" not in command:
        problems.append(f"the image's command is {command!r}, not flask's serve")
    return (health or {}).get("Test")


class Http:
    def __init__(self, port):
        self.port = port

    def __call__(self, method, path, body=None, timeout=10):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, data, {"Content-Type": "application/json"} if body is not None else {})
            response = conn.getresponse()
            payload = response.read()
            return response.status, (json.loads(payload) if payload else None)
        finally:
            conn.close()


class Containers:
    """The containers and volumes of this run; each container serves on 127.0.0.1:port of the host's network."""

    def __init__(self, image):
        self.image, self.names, self.volumes = image, [], []

    def volume(self, label):
        volume = f"dealership-ci-{os.getpid()}-{label}"
        self.volumes.append(volume)
        sh(["podman", "volume", "create", volume])
        return volume

    def start(self, label, volume, env=None):
        """A container of the image on `volume` (as /data), answering /health: (name, Http, /health's body)."""
        name = f"dealership-ci-{os.getpid()}-{label}"
        port = free_port()
        settings = (env or {}) | {"FLASK_SERVE_HOST": HOST, "FLASK_SERVE_PORT": str(port)}
        argv = ["podman", "run", "--detach", "--name", name, *podman_base_args(), "--network", "host",
                "--volume", f"{volume}:/data"]
        if not os.path.isdir("/run/systemd/system"):
            # podman runs HEALTHCHECKs on a systemd timer; without systemd, only on demand (below)
            argv += ["--health-interval", "disable"]
        for key, value in settings.items():
            argv += ["--env", f"{key}={value}"]
        self.names.append(name)
        sh(argv + [self.image], timeout=120)
        return name, Http(port), self.wait_healthy(name, port)

    def wait_healthy(self, name, port):
        deadline = time.monotonic() + START_SECONDS
        client = Http(port)
        while time.monotonic() < deadline:
            if self.state(name)["Status"] != "running":
                self.show_log(name)
                sys.exit(f"{NAME}: FAIL container {name} stopped before /health answered: {self.state(name)}")
            with contextlib.suppress(OSError, http.client.HTTPException, ValueError):
                status, body = client("GET", "/health", timeout=2)
                if status == 200:
                    say(f"{name}: /health answered 200 {body} on {HOST}:{port}")
                    return body
            time.sleep(0.25)
        self.show_log(name)
        sys.exit(f"{NAME}: FAIL {name}: /health did not answer 200 within {START_SECONDS} s")

    def state(self, name):
        return json.loads(sh(["podman", "inspect", "--format", "{{json .State}}", name], quiet=True).stdout)

    def log(self, name):
        done = sh(["podman", "logs", name], check=False, quiet=True, timeout=60)
        return done.stdout + done.stderr

    def show_log(self, name):
        say(f"--- log of {name} (last lines)")
        print("\n".join(self.log(name).splitlines()[-30:]), flush=True)

    def stop(self, name, problems):
        """podman stop: the image's STOPSIGNAL, then SIGKILL after STOP_TIMEOUT seconds."""
        started = time.monotonic()
        done = sh(["podman", "stop", "--time", str(STOP_TIMEOUT), name], timeout=STOP_TIMEOUT + 60, check=False)
        took = time.monotonic() - started
        state = self.state(name)
        say(f"{name}: stopped in {took:.1f} s, exit code {state['ExitCode']}")
        if done.returncode != 0:
            problems.append(f"podman stop {name} exited with {done.returncode}: {done.stderr.strip()}")
        if "SIGKILL" in done.stderr or took >= STOP_TIMEOUT:
            problems.append(f"{name} did not stop on SIGTERM within {STOP_TIMEOUT} s and was killed ({took:.1f} s)")
        if state["Status"] != "exited" or state["ExitCode"] != 0:
            problems.append(f"{name} ended {state['Status']} with exit code {state['ExitCode']}, not a clean exit (0)")
        if "stopped: requests in flight finished" not in self.log(name):
            problems.append(f"{name}: no clean stop in its log (no 'stopped: requests in flight finished')")
        if problems:
            self.show_log(name)

    def remove(self):
        for name in self.names:
            sh(["podman", "rm", "--force", "--time", "0", name], check=False, timeout=120)
        for volume in self.volumes:
            sh(["podman", "volume", "rm", "--force", volume], check=False, timeout=120)
        self.names, self.volumes = [], []


def in_future(days):
    """An ISO time `days` from now, on a whole hour, in UTC."""
    moment = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0) + timedelta(days=days)
    return moment.isoformat()


def inspect_running(name, test, problems):
    """The processes of a running container are no root's; its HEALTHCHECK passes, and fails when
    nothing answers; only the runtime requirements are installed, and psycopg's libpq loads."""
    ids = sh(["podman", "exec", name, "id", "-u"]).stdout.strip()
    if ids in ("", "0"):
        problems.append(f"podman exec {name} id -u answered {ids!r}: root")
    processes = sh(["podman", "top", name, "huser", "pid", "args"]).stdout.splitlines()[1:]
    say(f"{name}: {len(processes)} processes, users {sorted({line.split()[0] for line in processes})}")
    for line in processes:
        if line.split()[0] in ("0", "root"):
            problems.append(f"{name}: a process runs as root: {line}")
    if len(processes) < 2:
        problems.append(f"{name}: {len(processes)} processes, expected serve's supervisor and its workers")
    health = sh(["podman", "healthcheck", "run", name], check=False, timeout=60)
    say(f"{name}: podman healthcheck run exited with {health.returncode} {health.stdout.strip()}")
    if health.returncode != 0:
        problems.append(f"the image's HEALTHCHECK failed in {name}: {health.stdout.strip()} {health.stderr.strip()}")
    if test and test[0] == "CMD":  # the same command against a port nobody serves must fail
        done = sh(["podman", "exec", "--env", f"FLASK_SERVE_PORT={free_port()}", name, *test[1:]], check=False)
        if done.returncode == 0:
            problems.append(f"the image's HEALTHCHECK passes with nothing listening: {test}")
    probe = ("import importlib.util, sys, psycopg; print(psycopg.pq.version()); "
             "sys.exit(importlib.util.find_spec('pytest') is not None)")
    done = sh(["podman", "exec", name, "python", "-c", probe], check=False)
    if done.returncode != 0:
        problems.append(f"{name}: pytest is installed in the image, or psycopg's libpq does not load: "
                        f"{done.stdout.strip()} {done.stderr.strip()[-500:]}")


def exercise(name, http, problems):
    """A dealer, a car and a booking over HTTP, dates in the future; the booking read back. Returns it."""
    status, dealer = http("POST", f"{API}/dealers", {"name": "Container Motors", "location": "Hamburg, Germany"})
    if status != 201:
        problems.append(f"POST /dealers answered {status}: {dealer}")
        return None
    car_body = {"brand": "Toyota", "model": "Corolla", "year": 2024, "color": "White", "daily_price": 59.9,
                "vin": "JTDBR32E720123456", "dealer_id": dealer["id"]}
    status, car = http("POST", f"{API}/cars", car_body)
    if status != 201:
        problems.append(f"POST /cars answered {status}: {car}")
        return None
    booking_body = {"car_id": car["id"], "customer_name": "Ada Lovelace", "customer_email": "ada@example.com",
                    "start_datetime": in_future(7), "end_datetime": in_future(9)}
    status, booking = http("POST", f"{API}/bookings", booking_body)
    if status != 201:
        problems.append(f"POST /bookings answered {status}: {booking}")
        return None
    say(f"{name}: dealer {dealer['id']}, car {car['id']}, booking {booking['id']} "
        f"({booking['start_datetime']} to {booking['end_datetime']}, {booking['total_price']} {booking['currency']})")
    status, again = http("GET", f"{API}/bookings/{booking['id']}")
    if (status, again) != (200, booking):
        problems.append(f"GET /bookings/{booking['id']} answered {status} {again}, not 200 {booking}")
    return booking


def backup(name, work, problems):
    """The README's backup of a running container: flask backup into the volume, podman cp out."""
    done = sh(["podman", "exec", name, "flask", "backup", "/data/dealership-backup.sqlite3"], check=False, timeout=60)
    say(f"{name}: {done.stdout.strip()}")
    if done.returncode != 0 or "1 booking" not in done.stdout:
        problems.append(f"{name}: flask backup exited with {done.returncode}: {done.stdout.strip()} {done.stderr.strip()}")
        return
    copy = os.path.join(work, "dealership-backup.sqlite3")
    sh(["podman", "cp", f"{name}:/data/dealership-backup.sqlite3", copy], check=False, timeout=60)
    with contextlib.suppress(OSError), open(copy, "rb") as f:
        if f.read(16) == b"SQLite format 3\0":
            return
    problems.append(f"podman cp {name}:/data/dealership-backup.sqlite3 gave no SQLite file")


def check_compose(problems):
    """deploy/compose.yaml, read and checked; not run (its postgres image needs a registry)."""
    try:
        import yaml
    except ImportError:
        problems.append("PyYAML is missing (pip install pyyaml): deploy/compose.yaml not checked")
        return None
    path = os.path.join(ROOT, "deploy", "compose.yaml")
    with open(path) as f:
        compose = yaml.safe_load(f)
    services = compose.get("services") or {}
    app, db = services.get("dealership"), services.get("postgres")
    if not app or not db:
        problems.append(f"compose.yaml: services dealership and postgres expected, found {sorted(services)}")
        return None
    build = app.get("build") or {}
    context = os.path.normpath(os.path.join(ROOT, "deploy", build.get("context", ".")))
    if context != ROOT or not os.path.isfile(os.path.join(context, build.get("dockerfile", "Dockerfile"))) \
            or build.get("dockerfile") != "deploy/Dockerfile":
        problems.append(f"compose.yaml: the service is not built from deploy/Dockerfile at the repository's top: {build}")
    env = app.get("environment") or {}
    if not str(env.get("DEALERSHIP_DATABASE", "")).startswith("postgresql://") or "@postgres:" not in env["DEALERSHIP_DATABASE"]:
        problems.append(f"compose.yaml: DEALERSHIP_DATABASE does not name the postgres service: {env.get('DEALERSHIP_DATABASE')}")
    if (app.get("depends_on") or {}).get("postgres", {}).get("condition") != "service_healthy":
        problems.append("compose.yaml: the service does not wait for postgres to be healthy")
    for label, service in (("dealership", app), ("postgres", db)):
        test = (service.get("healthcheck") or {}).get("test") or []
        if not test or test[0] not in ("CMD", "CMD-SHELL"):
            problems.append(f"compose.yaml: {label} has no healthcheck")
        if service.get("restart") not in ("always", "unless-stopped", "on-failure"):
            problems.append(f"compose.yaml: {label} has no restart policy")
        for volume in service.get("volumes") or []:
            if volume.split(":")[0] not in (compose.get("volumes") or {}):
                problems.append(f"compose.yaml: {label}'s volume {volume} is not declared")
    if app.get("stop_signal") != "SIGTERM":
        problems.append("compose.yaml: the service's stop_signal is not SIGTERM")
    grace = str(app.get("stop_grace_period", "10s"))
    if not grace.endswith("s") or int(grace[:-1]) <= 30:
        problems.append(f"compose.yaml: stop_grace_period {grace} does not leave serve its 30 s")
    for port in app.get("ports") or []:
        if not str(port).startswith("127.0.0.1:"):
            problems.append(f"compose.yaml: port {port} is published on every address of the host")
    say("deploy/compose.yaml: read and checked (not run: the postgres image needs a registry)")
    return compose


def compose_environment(service):
    """A compose service's environment, each ${NAME:-default} as its default (${NAME}: empty), less
    the variables passed through from the shell (no value: unset when the shell has none)."""
    pattern = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
    return {key: pattern.sub(lambda m: m.group(2) or "", str(value))
            for key, value in (service.get("environment") or {}).items() if value is not None}


@contextlib.contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster from Debian's packages (installed if missing), run as the
    postgres user, listening on 127.0.0.1 at a free port with password authentication: yields
    (port, run), where run(sql) runs SQL as the superuser over its Unix socket. Stopped and removed
    however the block ends."""
    def pg_bins():
        return sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not pg_bins():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        sh(["apt-get", "update", "-q"], timeout=300, env=env)
        sh(["apt-get", "install", "-y", "-q", "postgresql", "postgresql-contrib"], timeout=600, env=env)
    bin_dir = os.path.dirname(pg_bins()[-1])
    folder = tempfile.mkdtemp(prefix="dealership-container-pg-")
    as_postgres = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(folder, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = os.path.join(folder, "data")
    pg_ctl = [*as_postgres, os.path.join(bin_dir, "pg_ctl"), "-D", data]
    try:
        # from /: the postgres user may not be allowed into this clone's folder
        sh([*as_postgres, os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256"], timeout=120, cwd="/")
        sh([*pg_ctl, "-l", os.path.join(folder, "log"), "-w", "-t", "60", "-o",
            f"-k {folder} -c listen_addresses={HOST} -p {port}", "start"], timeout=120, cwd="/")

        def sql(statement):
            sh([*as_postgres, os.path.join(bin_dir, "psql"), "-h", folder, "-p", str(port), "-U", "postgres",
                "-v", "ON_ERROR_STOP=1", "-q", "-c", statement], timeout=60, cwd="/")
        yield port, sql
    finally:
        sh([*pg_ctl, "-m", "fast", "-t", "60", "stop"], check=False, timeout=120, cwd="/")
        shutil.rmtree(folder, ignore_errors=True)


def check_postgresql(compose, containers, problems):
    """The service as deploy/compose.yaml configures it (its environment, each variable at its
    default), in the image, on a real PostgreSQL standing in for the compose's postgres service:
    a Debian cluster here on 127.0.0.1, with the role, password and database the compose file gives
    the postgres image (the role owns the database and is no superuser: it creates btree_gist as
    the owner). A booking made, found again by a new container, both stopped cleanly."""
    env = compose_environment(compose["services"]["dealership"])
    pg = compose_environment(compose["services"]["postgres"])
    user, password, database = pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"]
    with postgres_server() as (port, sql):
        sql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        sql(f"CREATE DATABASE {database} OWNER {user}")
        url = env["DEALERSHIP_DATABASE"]
        if "@postgres:5432/" not in url:
            problems.append(f"compose.yaml: DEALERSHIP_DATABASE {url} is not on postgres:5432")
            return
        env["DEALERSHIP_DATABASE"] = url.replace("@postgres:5432/", f"@{HOST}:{port}/")
        say(f"PostgreSQL on {HOST}:{port}; the compose file's settings for the service: "
            + ", ".join(f"{key}={value}" for key, value in env.items()))
        volume = containers.volume("postgresql")
        name, http, health = containers.start("postgresql-first", volume, env)
        if "pool" not in health:
            problems.append(f"{name}: /health on PostgreSQL has no pool: {health}")
        booking = exercise(name, http, problems)
        containers.stop(name, problems)
        if booking is None:
            return
        name, http, _ = containers.start("postgresql-second", volume, env)
        status, found = http("GET", f"{API}/bookings/{booking['id']}")
        if (status, found) != (200, booking):
            problems.append(f"on PostgreSQL, after a restart, GET /bookings/{booking['id']} answered {status} {found}")
        else:
            say(f"{name}: booking {booking['id']} found in PostgreSQL by a new container, the same body")
        containers.stop(name, problems)


def check_unit(work, problems):
    """deploy/dealership.service through systemd-analyze verify, in a scratch root: the host's own
    units (for the targets it names) and a stand-in for the venv's flask, which verify requires."""
    root = os.path.join(work, "unit-root")
    shutil.copytree("/lib/systemd/system", os.path.join(root, "usr/lib/systemd/system"), symlinks=True)
    os.makedirs(os.path.join(root, "etc/systemd/system"))
    shutil.copy(os.path.join(ROOT, "deploy", "dealership.service"), os.path.join(root, "etc/systemd/system"))
    flask = os.path.join(root, "opt/dealership/venv/bin/flask")
    os.makedirs(os.path.dirname(flask))
    with open(flask, "w") as f:
        f.write("#!/bin/sh\n")
    os.chmod(flask, 0o755)
    done = sh(["systemd-analyze", "verify", f"--root={root}", "/etc/systemd/system/dealership.service"], check=False)
    said = (done.stdout + done.stderr).strip()
    if done.returncode != 0 or said:
        problems.append(f"systemd-analyze verify deploy/dealership.service: exit {done.returncode}: {said}")
    else:
        say("deploy/dealership.service: systemd-analyze verify says nothing against it")


def readme_block(containing):
    """The ```sh block of the README's "Containers and systemd" that holds `containing`."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("\n## Containers and systemd\n", 1)[-1].split("\n## ", 1)[0]
    blocks = [block for block in re.findall(r"```sh\n(.*?)```", section, re.S) if containing in block]
    if len(blocks) != 1:
        sys.exit(f"{NAME}: FAIL the README's Containers and systemd has {len(blocks)} sh blocks with {containing!r}")
    return blocks[0]


def ensure_systemd_image(work):
    """The Debian base with systemd (as its first process), sudo and curl, as on a plain machine;
    kept in podman's storage like the base, made again only when missing."""
    if sh(["podman", "image", "exists", SYSTEMD_IMAGE], check=False).returncode == 0:
        say(f"image {SYSTEMD_IMAGE} found in podman's storage (made by an earlier run)")
        return
    folder = os.path.join(work, "systemd-image")
    os.makedirs(folder)
    with open(os.path.join(folder, "Containerfile"), "w") as f:
        f.write(f"FROM {BASE_IMAGE}\n"
                "RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                "systemd systemd-sysv sudo curl && rm -rf /var/lib/apt/lists/*\n"
                'CMD ["/sbin/init"]\n')
    sh(["podman", "build", "--network", "host", *podman_base_args(), "--tag", SYSTEMD_IMAGE, folder], timeout=600)


def in_container(name, method, path, body=None, timeout=10):
    """An HTTP request to 127.0.0.1:8000 inside container `name`, by its python3: (status, JSON body)."""
    script = ("import json, sys, urllib.request, urllib.error\n"
              "method, path, body = json.loads(sys.argv[1])\n"
              "data = None if body is None else json.dumps(body).encode()\n"
              "request = urllib.request.Request('http://127.0.0.1:8000' + path, data, method=method, "
              "headers={'Content-Type': 'application/json'} if data else {})\n"
              "try:\n"
              f"    response = urllib.request.urlopen(request, timeout={timeout})\n"
              "except urllib.error.HTTPError as error:\n"
              "    response = error\n"
              "except OSError as error:\n"
              "    print(json.dumps([0, str(error)])); sys.exit()\n"
              "text = response.read()\n"
              "print(json.dumps([response.status, json.loads(text) if text else None]))\n")
    done = sh(["podman", "exec", name, "python3", "-c", script, json.dumps([method, path, body])],
              quiet=True, timeout=timeout + 30)
    return tuple(json.loads(done.stdout))


def check_systemd(work, containers, problems):
    """The README's systemd steps, as written, in a container whose first process is systemd (on
    a network namespace of its own: port 8000 is the container's loopback, not the host's), pip set
    up as on this machine. Then: the service answers; a booking made; `systemctl stop` ends it
    with success (exit 0, SIGTERM, not killed); started again, the booking is there; its main
    process runs as dealership, with no new privileges, no capabilities, a system call filter, and
    a read-only file system but for /var/lib/dealership; the README's backup as the service's user."""
    ensure_systemd_image(work)
    name = f"dealership-ci-{os.getpid()}-systemd"
    containers.names.append(name)
    # --privileged: systemd needs it to set up the unit's sandbox (mount namespaces and the like)
    sh(["podman", "run", "--detach", "--name", name, "--privileged", "--systemd", "always", *podman_base_args(),
        "--volume", f"{ROOT}:/src:ro", SYSTEMD_IMAGE], timeout=120)
    settings, cert = pip_settings()
    if cert:
        sh(["podman", "cp", cert, f"{name}:/etc/ssl/pip-cert.pem"])
    conf = pip_conf(work, settings, "/etc/ssl/pip-cert.pem" if cert else None)
    if conf:
        sh(["podman", "cp", conf, f"{name}:/etc/pip.conf"])
    state = sh(["podman", "exec", name, "systemctl", "is-system-running", "--wait"], check=False, timeout=120)
    say(f"{name}: systemd is {state.stdout.strip()}")

    def unit(*argv, check=True):
        return sh(["podman", "exec", name, "systemctl", *argv], check=check, timeout=90)

    def journal():
        return sh(["podman", "exec", name, "journalctl", "-u", "dealership", "--no-pager"], check=False,
                  quiet=True, timeout=60).stdout

    steps = readme_block("systemctl enable --now dealership")
    done = sh(["podman", "exec", "--workdir", "/src", name, "bash", "-euo", "pipefail", "-c", steps], check=False,
              timeout=900)
    say(f"{name}: the README's steps exited with {done.returncode}, last line {done.stdout.strip()[-200:]!r}")
    if done.returncode != 0 or '"status":"ok"' not in done.stdout:
        problems.append(f"the README's systemd steps failed ({done.returncode}): {done.stderr.strip()[-1500:]}")
        print(journal()[-3000:], flush=True)
        return

    status, dealer = in_container(name, "POST", f"{API}/dealers", {"name": "Unit Motors", "location": "Bremen, Germany"})
    car_body = {"brand": "Skoda", "model": "Octavia", "year": 2023, "color": "Grey", "daily_price": 49.5,
                "vin": "TMBJJ7NE0J0123456", "dealer_id": (dealer or {}).get("id") if status == 201 else 1}
    status, car = in_container(name, "POST", f"{API}/cars", car_body)
    booking_body = {"car_id": (car or {}).get("id") if status == 201 else 1, "customer_name": "Grace Hopper",
                    "customer_email": "grace@example.com", "start_datetime": in_future(10), "end_datetime": in_future(11)}
    status, booking = in_container(name, "POST", f"{API}/bookings", booking_body)
    if status != 201:
        problems.append(f"under systemd, POST /bookings answered {status}: {booking}")
        return

    started = time.monotonic()
    unit("stop", "dealership")
    took = time.monotonic() - started
    shown = dict(line.partition("=")[::2] for line in
                 unit("show", "dealership", "-p", "Result", "-p", "ExecMainStatus", "-p", "ExecMainCode").stdout.split())
    say(f"{name}: systemctl stop took {took:.1f} s: {shown}")
    if shown.get("Result") != "success" or shown.get("ExecMainStatus") != "0" or took >= 40:
        problems.append(f"under systemd, the stop was not clean: {shown}, {took:.1f} s")
    if "stopped: requests in flight finished" not in journal():
        problems.append("under systemd, no worker logged its clean stop")

    unit("start", "dealership")
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and in_container(name, "GET", "/health", timeout=2)[0] != 200:
        time.sleep(0.5)
    found = in_container(name, "GET", f"{API}/bookings/{booking['id']}")
    if found != (200, booking):
        problems.append(f"under systemd, after a restart, booking {booking['id']} is {found}, not 200 {booking}")
    else:
        say(f"{name}: booking {booking['id']} found after systemctl stop and start, the same body")

    pid = unit("show", "dealership", "-p", "MainPID", "--value").stdout.strip()
    status_lines = sh(["podman", "exec", name, "cat", f"/proc/{pid}/status"], quiet=True).stdout
    proc = {key: value.split() for key, _, value in (line.partition(":") for line in status_lines.splitlines())}
    wanted = {"NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000000000000"}
    for key, value in wanted.items():
        if proc.get(key, [None])[0] != value:
            problems.append(f"under systemd, the service's {key} is {proc.get(key)}, not {value}")
    if proc.get("Uid", ["0"])[0] == "0":
        problems.append(f"under systemd, the service runs as root: Uid {proc.get('Uid')}")
    writes = sh(["podman", "exec", name, "nsenter", "--target", pid, "--mount", "--", "sh", "-c",
                 "touch /opt/dealership/probe 2>/dev/null && echo opt-writable; "
                 "touch /var/lib/dealership/probe && rm /var/lib/dealership/probe && echo state-writable"],
                check=False, quiet=True).stdout.split()
    if writes != ["state-writable"]:
        problems.append(f"under systemd, the service's file system is not read-only but for its state: {writes}")
    say(f"{name}: main process uid {proc.get('Uid', ['?'])[0]}, NoNewPrivs {proc.get('NoNewPrivs')}, "
        f"Seccomp {proc.get('Seccomp')}, CapEff {proc.get('CapEff')}, writable: {writes}")

    backup = readme_block("flask --app /opt/dealership/dealership.py backup")
    done = sh(["podman", "exec", "--workdir", "/root", name, "bash", "-euo", "pipefail", "-c", backup], check=False,
              timeout=120)
    say(f"{name}: the README's backup: {done.stdout.strip()}")
    if done.returncode != 0 or "1 booking" not in done.stdout:
        problems.append(f"the README's backup under systemd failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    unit("stop", "dealership")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", help="the image to build on (default: a Debian bookworm made here with debootstrap)")
    parser.add_argument("--fresh", action="store_true", help="make the two Debian base images again, as on a new machine")
    args = parser.parse_args()
    install_missing()
    problems = []
    work = tempfile.mkdtemp(prefix="dealership-container-")
    tag = f"localhost/dealership-ci:{os.getpid()}"
    containers = Containers(tag)
    try:
        base = args.base or BASE_IMAGE
        if args.fresh:
            sh(["podman", "rmi", "--force", SYSTEMD_IMAGE, BASE_IMAGE], check=False)
        ensure_base(work)  # for the systemd check in any case
        started = time.monotonic()
        sh(["podman", "build", "--format", "docker", "--network", "host", *podman_base_args(),
            "--build-arg", f"BASE={base}", *pip_secrets(work), "--file", "deploy/Dockerfile", "--tag", tag, "."],
           timeout=900, cwd=ROOT)
        say(f"image built in {time.monotonic() - started:.0f} s")
        test = check_image(tag, problems)

        volume = containers.volume("sqlite")
        name, http, _ = containers.start("first", volume)
        inspect_running(name, test, problems)
        booking = exercise(name, http, problems)
        backup(name, work, problems)
        containers.stop(name, problems)
        if booking is not None:
            name, http, _ = containers.start("second", volume)
            status, found = http("GET", f"{API}/bookings/{booking['id']}")
            if (status, found) != (200, booking):
                problems.append(f"after a restart on the volume, GET /bookings/{booking['id']} answered {status} {found}, "
                                f"not 200 {booking}")
            else:
                say(f"{name}: booking {booking['id']} found on the volume after the restart, the same body")
            containers.stop(name, problems)

        compose = check_compose(problems)
        if compose is not None:
            check_postgresql(compose, containers, problems)
        check_unit(work, problems)
        check_systemd(work, containers, problems)
    finally:
        containers.remove()
        sh(["podman", "rmi", "--force", tag], check=False, timeout=120)
        shutil.rmtree(work, ignore_errors=True)
    say("done")
    return verdict(NAME, problems)


if __name__ == "__main__":
    sys.exit(run(main))
