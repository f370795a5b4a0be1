#!/usr/bin/env python3
"""Holds N idle keep-alive connections to 127.0.0.1:PORT for scripts/bench's idle scenario.

Usage: idle-connections.py PORT N
Opens N connections, sends `GET /v2/` (HTTP/1.1, keep-alive) on each and reads its answer, then
prints `held N` and keeps them all open until a line arrives on stdin (or 60 s pass), then closes
them. Any connection that fails prints `failed: <why>` instead and exits 1.
"""
import resource
import select
import socket
import sys


def main():
    port, count = int(sys.argv[1]), int(sys.argv[2])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 64), hard))
    request = f"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    held = []
    try:
        for i in range(count):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            conn.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = conn.recv(4096)
                if not chunk:
                    raise ConnectionError(f"connection {i} closed before its answer")
                answer += chunk
            if not answer.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(f"connection {i}: {answer.splitlines()[0]!r}")
            held.append(conn)
    except OSError as error:
        print(f"failed: {error} after {len(held)} connections", flush=True)
        return 1
    print(f"held {len(held)}", flush=True)
    select.select([sys.stdin], [], [], 60)
    for conn in held:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
