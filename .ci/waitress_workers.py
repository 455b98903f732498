"""N waitress processes on one listening socket, for the throughput benchmark's comparison only:

    python .ci/waitress_workers.py --port 8000 --workers 2 --threads 8 dealership:create_app

waitress serves one process; this opens the socket, then starts N processes that inherit it and each
serve the app made by the factory on it. Stops them all on SIGTERM or SIGINT.
"""
import argparse
import importlib
import os
import signal
import socket
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.fd is not None:  # a worker
        import waitress
        module, _, factory = a.target.partition(":")
        app = getattr(importlib.import_module(module), factory)()
        waitress.serve(app, sockets=[socket.socket(fileno=a.fd)], threads=a.threads, connection_limit=1000,
                       channel_timeout=30)
        return
    listener = socket.create_server((a.host, a.port), backlog=1024)
    listener.set_inheritable(True)
    children = [subprocess.Popen([sys.executable, __file__, a.target, "--port", str(a.port), "--threads",
                                  str(a.threads), "--fd", str(listener.fileno())], pass_fds=[listener.fileno()])
                for _ in range(a.workers)]

    def stop(*_):
        for child in children:
            child.terminate()
        for child in children:
            child.wait()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    os.wait()
    stop()


if __name__ == "__main__":
    main()
