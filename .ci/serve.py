"""The service under the README's production command, on free loopback ports, for the CI checks.

    with serve(threads=8, env={"DEALERSHIP_API_KEY": "k"}) as (base_url, server): ...
    with serve(processes=2) as servers: ...            # [(base_url, server), ...] on one database file
    server, base_url = start(database, threads=8)        # by hand, for a test that kills it

Starts `waitress --listen=127.0.0.1:PORT --call dealership:create_app` from the project root with
the caller's environment less any DEALERSHIP_* setting (plus `env`), on a database file in a new
temporary folder unless `env` names one, waits for /health, and stops every server however the
block exits. Their output goes to log files in the temporary folder, which the check settles when
it ends: a check that runs as `sys.exit(run(main))` has them removed if it passed (exit code 0) and
keeps them, printing their paths, if it failed. A script that does not settle them has them removed
when it exits, unless a server block ended by an exception or a server had stopped on its own.
"""
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGS = []  # the server logs this process made and has not settled yet
# The servers' own temporary folder (TMPDIR): `serve` keeps its workers' metrics there, and a server
# killed -9 cannot remove what it made; this process removes it all when it exits.
SCRATCH = tempfile.mkdtemp(prefix="dealership-scratch-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)
TROUBLE = []  # why a log must be kept for a script that does not settle its logs itself


def new_log(prefix="dealership-server-"):
    """A new log file for a server's output, in the temporary folder, to be settled at the end."""
    log = tempfile.NamedTemporaryFile("w+", prefix=prefix, suffix=".log", delete=False)
    LOGS.append(log.name)
    return log


def settle_logs(passed):
    """Remove the server logs made so far if the check passed; else print where they are."""
    while LOGS:
        path = LOGS.pop(0)
        if passed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        elif os.path.exists(path):
            print(f"server log: {path}", flush=True)


atexit.register(lambda: settle_logs(passed=not TROUBLE))


def run(main):
    """`sys.exit(run(main))`: main's exit code; the server logs removed if it is 0, else kept and
    printed. SIGTERM (a CI timeout, say) ends main like an error, so the servers are still stopped
    and the temporary folders removed."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    passed = False
    try:
        code = main()
        passed = not code
        return code
    except SystemExit as error:
        passed = error.code in (None, 0)
        raise
    finally:
        settle_logs(passed)


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(url, process, seconds=30):
    """Return once `url` answers; exit if `process` dies or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{process.args[0]} exited with {process.returncode} before {url} answered")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"{url} did not answer within {seconds} s")


def stop(process):
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def start(database, threads=4, env=None, command="waitress", workers=None):
    """One server on `database`, answering /health: (process, base_url). Stop it with stop().

    `command` "waitress" is `waitress-serve --call dealership:create_app`; "serve" is
    `flask --app dealership serve`, the service's own production command, with its default workers
    unless `workers` says (its process is then the supervisor of the workers; it is started in a
    session of its own, so that os.killpg(process.pid, ...) reaches every worker too).
    """
    port = free_port()
    base = f"http://{HOST}:{port}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {"TMPDIR": SCRATCH}
    clean |= {"DEALERSHIP_DATABASE": database} | (env or {})
    log = new_log()
    argv = {"waitress": ["-m", "waitress", f"--listen={HOST}:{port}", f"--threads={threads}", "--call",
                         "dealership:create_app"],
            "serve": ["-m", "flask", "--app", "dealership", "serve", "--host", HOST, "--port", str(port),
                      "--threads", str(threads)] + ([] if workers is None else ["--workers", str(workers)])}[command]
    with log:
        server = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=clean, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    server.log = log.name
    try:
        wait_for(f"{base}/health", server)
    except BaseException:
        stop(server)
        raise
    return server, base


@contextlib.contextmanager
def serve(threads=4, env=None, processes=None, command="waitress", workers=None):
    """One server (yields (base_url, process)) or, with `processes`, that many on one database file
    (yields a list of them)."""
    folder = tempfile.mkdtemp(prefix="dealership-data-")
    database = (env or {}).get("DEALERSHIP_DATABASE", os.path.join(folder, "dealership.sqlite3"))
    servers = []
    try:
        for _ in range(processes or 1):
            server, base = start(database, threads, env, command, workers)
            servers.append((base, server))
        yield servers if processes else servers[0]
    except BaseException as error:
        TROUBLE.append(repr(error))
        raise
    finally:
        for _, server in servers:
            if server.poll() is not None:
                TROUBLE.append(f"{server.args} exited with {server.returncode}")
            stop(server)
        shutil.rmtree(folder, ignore_errors=True)


def verdict(name, problems):
    """Print the problems a check found (the first 20) and its verdict; return its exit code."""
    for line in problems[:20]:
        print(f"{name}: FAIL {line}")
    print(f"{name}: passed" if not problems else f"{name}: failed with {len(problems)} problems")
    return 1 if problems else 0


def every_booking(get):
    """Every stored booking, page by page (the service answers at most 1,000 a page): `get(path)`
    answers (status, JSON). Returns (the first status that was not 200, or 200; the bookings)."""
    found = []
    while True:
        status, page = get(f"/api/v1/bookings?limit=1000&offset={len(found)}")
        if status != 200:
            return status, found
        found += page
        if len(page) < 1000:
            return status, found
