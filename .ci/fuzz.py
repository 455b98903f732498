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
import subprocess
import sys

from serve import serve

KEY = "fuzz-key-0123456789"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-examples", type=int, default=100)
    a = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    # The fuzzer sends many requests without the key on purpose: it must not be throttled for them.
    env = {"DEALERSHIP_API_KEY": KEY, "DEALERSHIP_REFUSED_KEY_LIMIT": "1000000/minute"}
    with serve(threads=4, env=env) as (base, server):
        fuzz_env = os.environ | {"SCHEMATHESIS_HOOKS": "fuzz_hooks",
                                 "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        command = ["schemathesis", "run", f"{base}/openapi.json", "--checks", "all",
                   "--max-examples", str(a.max_examples), "--header", f"Authorization: Bearer {KEY}",
                   "--request-timeout", "10", "--no-color"]
        print("fuzz: " + " ".join(command).replace(KEY, "<key>"), flush=True)
        result = subprocess.run(command, env=fuzz_env, timeout=1800)
        if server.poll() is not None:
            print(f"fuzz: the server died during the run ({server.returncode})")
            return 1
    print("fuzz: passed" if result.returncode == 0 else f"fuzz: failed ({result.returncode})")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
