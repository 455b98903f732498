#!/usr/bin/env python3
"""What an fdatasync costs the code that runs after it, on this machine: no service involved.

Run from the project root with the project's environment active:

    python .ci/after_sync.py

It times the scale benchmark's floor for create/floor (a bare Flask app: POST echoing a booking's
body, then DELETE answering 204, through the test client) in rounds that alternate: right after
writing 4 KiB to a file in a temporary folder and calling os.fdatasync on it, and with no sync. It
prints the median of each and the fdatasync itself. On a machine whose cores idle while the disk
syncs (a virtual machine, typically), the pair that follows a sync is slower: its caches went cold.
A booking on a SQLite file pays this twice per create/floor pair (one COMMIT for the booking, one for
the cancellation), on top of the syncs themselves.
"""
import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.getcwd())
from bench import T0, booking, floor_client  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2000, help="pairs of each kind (default 2000)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # so the folder is still removed
    floor = floor_client({})
    probe = booking(1, T0, 1)
    scratch = tempfile.mkdtemp(prefix="dealership-sync-")
    fd = os.open(os.path.join(scratch, "sync.bin"), os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, b"\0" * 8192)
        os.fsync(fd)
        page = b"\1" * 4096
        after, without, syncs = [], [], []
        for n in range(a.rounds * 2 + 200):  # the first 200 warm up
            synced = n % 2 == 0
            if synced:
                os.pwrite(fd, page, 0)
                start = time.perf_counter()
                os.fdatasync(fd)
                syncs.append(time.perf_counter() - start)
            start = time.perf_counter()
            floor.post("/echo", json=probe)
            floor.delete("/echo")
            took = time.perf_counter() - start
            if n >= 200:
                (after if synced else without).append(took)
    finally:
        os.close(fd)
        shutil.rmtree(scratch, ignore_errors=True)
    ms = lambda values: statistics.median(values) * 1000  # noqa: E731
    print(f"fdatasync of 4 KiB:             {ms(syncs):.3f} ms (median of {len(syncs)})")
    print(f"floor pair right after a sync:  {ms(after):.3f} ms")
    print(f"floor pair with no sync before: {ms(without):.3f} ms")
    print(f"after / without:                {statistics.median(after) / statistics.median(without):.2f}")


if __name__ == "__main__":
    main()
