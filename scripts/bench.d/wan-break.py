#!/usr/bin/env python3
"""The WAN scenario's fault proxy: a TCP relay in front of one upstream registry that breaks one
blob download once, at a given fraction of the blob, and logs what it relayed per request.

Usage: wan-break.py LISTEN_HOST LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT DIGEST SIZE FRACTION LOG

It runs in the upstream's network namespace, so everything it relays crosses the shaped veth. The
first GET whose path names DIGEST is cut after FRACTION x SIZE bytes of its response: both sockets
are closed, the peer's with a reset (SO_LINGER 0), as a dropped WAN link looks to the peer. Every
later request passes untouched. LOG gets one JSON line per request (seq, method, path, range,
bytes_down: response bytes relayed to the peer, headers included; broken: whether this one was
cut), written when the next request on its connection starts, the connection closes, or the proxy
is stopped (SIGTERM: a peer may keep its connection to the upstream open).

Requests are told apart on the wire: HTTP/1.1 without pipelining, as the peers speak to an
upstream, so a request line starts each request and everything relayed back until the next one is
its response. Prints `listening` once the socket is bound.
"""
import json
import re
import signal
import socket
import struct
import sys
import threading

REQUEST = re.compile(rb"(?:^|\r\n)(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/1\.[01]\r\n")
RANGE = re.compile(rb"\r\nrange: *([^\r\n]*)", re.IGNORECASE)


class State:
    def __init__(self, digest, threshold, log):
        self.digest = digest.encode()
        self.threshold = threshold
        self.armed = True
        self.seq = 0
        # Reentrant: the SIGTERM handler takes it in the main thread, which may hold it already.
        self.lock = threading.RLock()
        self.log = open(log, "a", buffering=1)
        self.connections = set()

    def next_seq(self):
        with self.lock:
            self.seq += 1
            return self.seq

    def write(self, record):
        with self.lock:
            self.log.write(json.dumps(record) + "\n")


class Connection:
    def __init__(self, state, client, upstream):
        self.state, self.client, self.upstream = state, client, upstream
        self.lock = threading.Lock()
        self.current = None  # the request whose response is being relayed
        self.closed = False

    def finish(self):
        """Logs the current request (with the lock held)."""
        if self.current is not None:
            self.state.write(self.current)
            self.current = None

    def request(self, data):
        match = None
        for match in REQUEST.finditer(data):
            pass
        if match is None:
            return
        rng = RANGE.search(data, match.start())
        with self.lock:
            self.finish()
            method, path = match.group(1).decode(), match.group(2).decode(errors="replace")
            self.current = {"seq": self.state.next_seq(), "method": method, "path": path,
                            "range": rng.group(1).decode(errors="replace") if rng else None,
                            "bytes_down": 0, "broken": False}
            target = method == "GET" and self.state.digest.decode() in path
            with self.state.lock:
                if target and self.state.armed:
                    self.state.armed = False
                    self.current["cut_at"] = self.state.threshold

    def close(self, reset=False):
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.finish()
        with self.state.lock:
            self.state.connections.discard(self)
        # A reset, not a FIN: SHUT_RD wakes the thread blocked reading the peer without sending
        # anything, then the close with SO_LINGER 0 sends the RST.
        for sock, how in ((self.client, socket.SHUT_RD if reset else socket.SHUT_RDWR),
                          (self.upstream, socket.SHUT_RDWR)):
            try:
                if reset and sock is self.client:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(how)
            except OSError:
                pass
            sock.close()

    def up(self):
        """Peer to upstream: requests."""
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                self.request(data)
                self.upstream.sendall(data)
        except OSError:
            pass
        self.close()

    def down(self):
        """Upstream to peer: responses, cut once at the threshold."""
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                with self.lock:
                    current = self.current
                    cut = None
                    if current is not None and "cut_at" in current:
                        left = current["cut_at"] - current["bytes_down"]
                        if len(data) >= left:
                            cut, data = True, data[:max(left, 0)]
                    if current is not None:
                        current["bytes_down"] += len(data)
                        if cut:
                            current["broken"] = True
                            del current["cut_at"]
                self.client.sendall(data)
                if cut:
                    self.close(reset=True)
                    return
        except OSError:
            pass
        self.close()


def main():
    host, port, up_host, up_port, digest, size, fraction, log = sys.argv[1:9]
    state = State(digest, int(int(size) * float(fraction)), log)

    def stop(_signum, _frame):
        with state.lock:
            live = list(state.connections)
        for conn in live:
            with conn.lock:
                conn.finish()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, int(port)))
    listener.listen(128)
    print("listening", flush=True)
    while True:
        client, _ = listener.accept()
        try:
            upstream = socket.create_connection((up_host, int(up_port)), timeout=10)
            upstream.settimeout(None)
        except OSError:
            client.close()
            continue
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(state, client, upstream)
        with state.lock:
            state.connections.add(conn)
        threading.Thread(target=conn.up, daemon=True).start()
        threading.Thread(target=conn.down, daemon=True).start()


if __name__ == "__main__":
    main()
