#!/usr/bin/env python3
"""Turns the WAN scenario's measurements into results.json and results.md.

Usage: wan-report.py WAN_TSV OUT_DIR
WAN_TSV holds lines `peer<TAB>key<TAB>value`; the peer `meta` describes the run.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The bench's own report: the results file's format and the figures' formatting are one.
from report import fmt, load  # noqa: E402

# key, label, unit, better ("higher" / "lower"): one row each, the peers side by side.
METRICS = [
    ("cold1_wall_s", "cold pull, 1 client: wall time", "s", "lower"),
    ("cold1_upstream_requests", "cold pull, 1 client: upstream requests", "", "lower"),
    ("cold1_upstream_blob_gets", "cold pull, 1 client: upstream blob GETs ({blobs} blobs)", "", "lower"),
    ("cold1_upstream_mib", "cold pull, 1 client: upstream MiB (image {mib} MiB)", "MiB", "lower"),
    ("seq1_wall_s", "cold pull, 1 client fetching one blob at a time: wall time", "s", "lower"),
    ("seq1_upstream_blob_gets", "cold pull, one blob at a time: upstream blob GETs", "", "lower"),
    ("cold8_wall_s", "cold pull, {clients} clients: wall time", "s", "lower"),
    ("cold8_upstream_requests", "cold pull, {clients} clients: upstream requests", "", "lower"),
    ("cold8_upstream_blob_gets", "cold pull, {clients} clients: upstream blob GETs", "", "lower"),
    ("cold8_upstream_mib", "cold pull, {clients} clients: upstream MiB", "MiB", "lower"),
    ("tags_upstream_manifest_gets", "tag by 3 client types: upstream manifest GETs", "", "lower"),
    ("tags_upstream_requests", "tag by 3 client types: upstream requests, all kinds", "", "lower"),
    ("break_wall_s", "{break_mib} MiB blob cut at {at}%: time to complete", "s", "lower"),
    ("break_client_attempts", "cut blob: client attempts (Range resume)", "", "lower"),
    ("break_client_statuses", "cut blob: the attempts' HTTP statuses", "", None),
    ("break_intact", "cut blob: the client's copy has the blob's digest (1 yes, 0 no)", "", "higher"),
    ("break_refetch_mib", "cut blob: upstream MiB sent again after the cut", "MiB", "lower"),
    ("break_refetch_vs_rest", "cut blob: re-fetched / the remaining {rest}%", "x", "lower"),
    ("break_refetch_gets", "cut blob: upstream GETs after the cut (ranged)", "", "lower"),
]


def advantage(gantry, other, better):
    """How many times better gantry is (>1: gantry better); None where a zero on either side makes
    a ratio say nothing."""
    if better is None or not isinstance(gantry, (int, float)) or not isinstance(other, (int, float)):
        return None
    if not gantry or not other:
        return None
    return gantry / other if better == "higher" else other / gantry


def markdown(meta, peers, order):
    at = round(float(meta.get("break_at", 0.8)) * 100)
    context = {
        "blobs": meta.get("image_blobs", "?"),
        "mib": round(meta.get("image_bytes", 0) / 2**20),
        "clients": meta.get("clients", "?"),
        "break_mib": round(meta.get("break_blob_bytes", 0) / 2**20),
        "at": at,
        "rest": 100 - at,
    }
    others = [p for p in order if p != "gantry"]
    head = ["metric", "unit"] + order + ([f"gantry vs {p}" for p in others] if "gantry" in order else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios = {}
    for key, label, unit, better in METRICS:
        cells = [label.format(**context), unit]
        for p in order:
            value = peers[p].get(key)
            cell = value if isinstance(value, str) else fmt(value)
            if key == "break_refetch_gets" and key in peers[p]:
                cell += f" ({fmt(peers[p].get('break_refetch_ranged'))})"
            cells.append(cell)
        if "gantry" in order:
            for p in others:
                adv = advantage(peers["gantry"].get(key), peers[p].get(key), better)
                ratios.setdefault(p, {})[key] = adv
                cells.append("—" if adv is None else f"{adv:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    out = ["## WAN results", ""]
    out.append(f"Run {meta.get('date', '?')} at commit {meta.get('commit', '?')}, scale `{meta.get('scale')}` "
               f"(image layers {meta.get('layers')}: {context['blobs']} blobs, {context['mib']} MiB; a "
               f"{context['break_mib']} MiB blob cut at {at}%), {meta.get('cpu', '?')}.")
    out.append(f"Link: {meta.get('shaping', '?')}; TCP connect to the upstream (one RTT) "
               f"{fmt(meta.get('rtt_ms'))} ms before the run, {fmt(meta.get('rtt_after_ms'))} ms after; one "
               f"blob straight from the upstream {fmt(meta.get('direct_mibps'))} MiB/s; the link's qdiscs sent "
               f"{fmt(meta.get('down_qdisc_sent_mib'))} MiB towards the peers and "
               f"{fmt(meta.get('up_qdisc_sent_mib'))} MiB towards the upstream; packets held by the delay "
               f"line: {fmt(meta.get('delayed_packets'))}.")
    out.append(f"Versions: {meta.get('versions', '?')}.")
    if "gantry_binary" in meta:
        out.append(f"gantry binary: {meta['gantry_binary']}.")
    busy = meta.get("busy_samples", 0)
    out.append(("Machine was quiet (no cargo, rustc or test binary running) at every measurement"
                if not busy else
                f"NOT QUIET: cargo, rustc or test binaries were running at {busy} of "
                f"{busy + meta.get('quiet_samples', 0)} measurements")
               + f"; highest 1-minute load average at a measurement: {meta.get('max_load', '?')}.")
    out.append("")
    out.append("Upstream figures from each peer's own upstream (its access log; MiB: GET bodies); the cut "
               "blob's from the fault proxy (response bytes relayed after the cut, headers included). "
               "`gantry vs X`: above 1.00x gantry is better; — where a zero on either side makes a ratio "
               "meaningless (compare the counts).")
    out.append("")
    out.extend(lines)
    return "\n".join(out) + "\n", ratios


def main():
    tsv, out_dir = sys.argv[1], sys.argv[2]
    meta, peers = load(tsv)
    order = [p for p in ("gantry", "nginx", "distribution") if p in peers] + sorted(
        p for p in peers if p not in ("gantry", "nginx", "distribution"))
    text, ratios = markdown(meta, peers, order)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "peers": peers, "gantry_advantage": ratios,
                   "metrics": [{"key": k, "label": l, "unit": u, "better": b} for k, l, u, b in METRICS]},
                  f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
