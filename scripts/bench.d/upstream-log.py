#!/usr/bin/env python3
"""Counts what one peer asked of its own upstream registry, from that registry's access log.

Usage: upstream-log.py ACCESS_LOG FROM_LINE
Reads the combined-format lines after line FROM_LINE (distribution writes one per request when it
completes) and prints a JSON object: requests, blob_gets, blob_get_bytes (bytes of blob GET bodies
sent), get_bytes (bytes of every GET body), manifest_requests, blob_heads, by_method.
"""
import json
import re
import sys

LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<size>\d+|-)')


def main():
    path, start = sys.argv[1], int(sys.argv[2])
    out = {"requests": 0, "blob_gets": 0, "blob_get_bytes": 0, "get_bytes": 0,
           "manifest_requests": 0, "blob_heads": 0, "by_method": {}}
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number <= start:
                continue
            m = LINE.search(line)
            if not m:
                continue
            method, target = m.group("method"), m.group("path")
            size = int(m.group("size")) if m.group("size") != "-" else 0
            out["requests"] += 1
            out["by_method"][method] = out["by_method"].get(method, 0) + 1
            if method == "GET":
                out["get_bytes"] += size
            if "/blobs/" in target:
                if method == "GET":
                    out["blob_gets"] += 1
                    out["blob_get_bytes"] += size
                elif method == "HEAD":
                    out["blob_heads"] += 1
            elif "/manifests/" in target:
                out["manifest_requests"] += 1
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
