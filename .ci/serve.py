"""The service under the README's production command, on a free loopback port, for the CI checks.

    with serve(threads=8, env={"DEALERSHIP_API_KEY": "k"}) as (base_url, server): ...

Starts `waitress --listen=127.0.0.1:PORT --call dealership:create_app` from the project root with
the caller's environment less any DEALERSHIP_* setting (plus `env`), waits for /health, and stops
the server however the block exits. Its output goes to a log file whose path is printed at the end.
"""
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serve(threads=4, env=None):
    port = free_port()
    base = f"http://{HOST}:{port}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | (env or {})
    log = tempfile.NamedTemporaryFile("w+", prefix="dealership-server-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "waitress", f"--listen={HOST}:{port}", f"--threads={threads}",
                               "--call", "dealership:create_app"], cwd=ROOT, env=clean, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(f"{base}/health", server)
        yield base, server
    finally:
        stop(server)
        print(f"server log: {log.name}")
