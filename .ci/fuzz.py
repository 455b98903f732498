#!/usr/bin/env python3
"""Contract fuzz run: schemathesis against the production server on 127.0.0.1, every check on.

    python .ci/fuzz.py [--max-examples 100]

Starts waitress (as the README says) with an API key on a free loopback port, so that the document
declares bearer auth and the `ignored_auth` check can prove writes without the key are refused; then
runs `schemathesis run /openapi.json --checks all` with at least --max-examples cases per operation
in every phase, and the hook in .ci/fuzz_hooks.py for the rules JSON Schema cannot state. Exits
non-zero on any failure; the server is stopped however this exits.
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HOST = "127.0.0.1"
KEY = "fuzz-key"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(url, server, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"fuzz: the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"fuzz: {url} did not answer in time")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-examples", type=int, default=100)
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="dealership-fuzz-", suffix=".log", delete=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEALERSHIP_")} | {"DEALERSHIP_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "waitress", f"--listen={HOST}:{port}", "--threads=4",
                               "--call", "dealership:create_app"], cwd=root, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        wait_for(f"http://{HOST}:{port}/health", server)
        fuzz_env = os.environ | {"SCHEMATHESIS_HOOKS": "fuzz_hooks",
                                 "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        command = ["schemathesis", "run", f"http://{HOST}:{port}/openapi.json", "--checks", "all",
                   "--max-examples", str(a.max_examples), "--header", f"Authorization: Bearer {KEY}",
                   "--request-timeout", "10", "--no-color"]
        print("fuzz: " + " ".join(command).replace(KEY, "<key>"), flush=True)
        result = subprocess.run(command, env=fuzz_env, timeout=1800)
        if server.poll() is not None:
            print(f"fuzz: the server died during the run ({server.returncode})")
            return 1
        print("fuzz: passed" if result.returncode == 0 else f"fuzz: failed ({result.returncode})")
        return result.returncode
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        print(f"fuzz: server log in {log.name}")


if __name__ == "__main__":
    sys.exit(main())
