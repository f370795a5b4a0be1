#!/usr/bin/env python3
"""The WAN scenario's delay line, for kernels without sch_netem: holds every packet that an
NFQUEUE rule hands it for DELAY_MS, then lets it go (optionally drops LOSS_PERCENT of them).

Usage: wan-delay.py QUEUE_NUM DELAY_MS [LOSS_PERCENT]

scripts/bench.d/wan.sh runs it inside the upstream's network namespace, with iptables rules there
(mangle OUTPUT out of the veth, mangle PREROUTING in from it) that queue every packet crossing the
veth to QUEUE_NUM, so each direction gets DELAY_MS; the rate is tc's (tbf on both veth ends).
The nfnetlink_queue protocol is spoken directly (no libnetfilter_queue): bind the queue, metadata
only (no payload copied), GSO packets whole, and a verdict (accept, or drop) per packet id once its
time is up. All packets wait the same time, so verdicts go out in arrival order and the stream
keeps its order. Prints `bound` once the queue is bound.
"""
import collections
import os
import random
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 4
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2


def attr(kind, payload):
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def message(kind, queue, attrs, flags=NLM_F_REQUEST, seq=0):
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, seq, 0) + body


def config(sock, queue, attrs, seq):
    """Sends one config message and checks the kernel's acknowledgement."""
    sock.send(message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
    while True:
        data = sock.recv(65536)
        length, kind = struct.unpack_from("=IH", data)
        if kind == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, 16)
            if error:
                raise OSError(-error, f"nfqueue config: {os.strerror(-error)}")
            return


def packets(data):
    """The packet ids in one recv's worth of netlink messages."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at = offset + 20  # nlmsghdr + nfgenmsg
            while at + 4 <= offset + length:
                alen, akind = struct.unpack_from("=HH", data, at)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    yield struct.unpack_from(">I", data, at + 4)[0]
                at += (alen + 3) & ~3
        offset += (length + 3) & ~3


def main():
    queue, delay = int(sys.argv[1]), float(sys.argv[2]) / 1000
    loss = float(sys.argv[3].rstrip("%")) / 100 if len(sys.argv) > 3 and sys.argv[3] else 0.0
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    # Room for a burst of packet messages while earlier ones wait (root may exceed rmem_max).
    sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE
    sock.bind((0, 0))
    config(sock, queue, [attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET))], 1)
    config(sock, queue, [attr(NFQA_CFG_PARAMS, struct.pack(">IB", 0, NFQNL_COPY_META))], 2)
    config(sock, queue, [attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack(">I", 65536))], 3)
    config(sock, queue, [attr(NFQA_CFG_FLAGS, struct.pack(">I", NFQA_CFG_F_GSO)),
                         attr(NFQA_CFG_MASK, struct.pack(">I", NFQA_CFG_F_GSO))], 4)
    print("bound", flush=True)
    waiting = collections.deque()  # (release time, packet id)
    while True:
        timeout = max(waiting[0][0] - time.monotonic(), 0) if waiting else None
        ready, _, _ = select.select([sock], [], [], timeout)
        if ready:
            data = sock.recv(1 << 20)
            now = time.monotonic()
            for packet_id in packets(data):
                waiting.append((now + delay, packet_id))
        now = time.monotonic()
        verdicts = []
        while waiting and waiting[0][0] <= now:
            _, packet_id = waiting.popleft()
            verdict = NF_DROP if loss and random.random() < loss else NF_ACCEPT
            verdicts.append(message(NFQNL_MSG_VERDICT, queue,
                                    [attr(NFQA_VERDICT_HDR, struct.pack(">II", verdict, packet_id))]))
        for verdict in verdicts:
            sock.send(verdict)


if __name__ == "__main__":
    main()
