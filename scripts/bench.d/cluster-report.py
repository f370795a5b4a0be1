#!/usr/bin/env python3
"""Turns the cluster scenario's measurements into cluster.json and cluster.md.

Usage: cluster-report.py CLUSTER_TSV OUT_DIR
CLUSTER_TSV holds lines `peer<TAB>key<TAB>value`; the peer `meta` describes the run.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The bench's own report: the results file's format and the figures' formatting are one.
from report import fmt, load  # noqa: E402

# key, column, better ("higher" / "lower"): the table, one row per peer.
COLUMNS = [
    ("cold_wall_s", "cold wall s", "lower"),
    ("cold_upstream_blob_gets", "upstream blob GETs", "lower"),
    ("cold_upstream_mib", "upstream MiB", "lower"),
    ("warm_wall_s", "warm wall s", "lower"),
    ("warm_upstream_blob_gets", "warm upstream blob GETs", "lower"),
    ("warm_mibps", "warm MiB/s", "higher"),
    ("cold_cpu_s", "CPU s, cold", "lower"),
    ("warm_cpu_s", "CPU s, warm", "lower"),
]


def advantage(gantry, other, better):
    """How many times better gantry is (>1: gantry better); None where a zero on either side makes
    a ratio say nothing (0 upstream GETs against 12 is "none against some", not 0.00x)."""
    if not isinstance(gantry, (int, float)) or not isinstance(other, (int, float)):
        return None
    if not gantry or not other:
        return None
    return gantry / other if better == "higher" else other / gantry


def markdown(meta, peers, order):
    head = ["peer"] + [label for _, label, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for peer in order:
        row = peers[peer]
        lines.append("| " + " | ".join([peer] + [fmt(row.get(key)) for key, _, _ in COLUMNS]) + " |")
    ratios = {}
    if "gantry" in peers:
        for other in (p for p in order if p != "gantry"):
            cells = []
            for key, _, better in COLUMNS:
                adv = advantage(peers["gantry"].get(key), peers[other].get(key), better)
                ratios.setdefault(other, {})[key] = adv
                cells.append("—" if adv is None else f"{adv:.2f}x")
            lines.append("| " + " | ".join([f"gantry vs {other}"] + cells) + " |")
    blobs, mib = meta.get("image_blobs", "?"), round(meta.get("image_bytes", 0) / 2**20)
    out = ["## Cluster", ""]
    out.append(f"Run {meta.get('date', '?')} at commit {meta.get('commit', '?')}, scale `{meta.get('scale')}` "
               f"(image layers {meta.get('layers')}: {blobs} blobs, {mib} MiB), {meta.get('replicas')} replicas "
               f"per peer behind a round-robin nginx, {meta.get('clients')} concurrent skopeo pulls per phase, "
               f"{meta.get('cpu', '?')}.")
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
    out.append(f"Cold: every tier empty; upstream counted until the object tier held every blob (the ideal: "
               f"{blobs} blob GETs, {mib} MiB, for the whole cluster). Warm: replicas restarted, gantry's local "
               f"tiers wiped; MiB/s is {meta.get('clients')} x {mib} MiB over the wall time. CPU: user + system "
               "seconds of the replicas, summed. `gantry vs X`: above 1.00x gantry is better; — where a zero "
               "on either side makes a ratio meaningless (compare the counts).")
    out.append("")
    out.extend(lines)
    extra = []
    for peer in order:
        row = peers[peer]
        note = (f"- {peer}: upstream requests of all kinds {fmt(row.get('cold_upstream_requests'))} cold "
                f"({fmt(row.get('cold_upstream_manifest_requests'))} for manifests), "
                f"{fmt(row.get('warm_upstream_requests'))} warm ({fmt(row.get('warm_upstream_mib'))} MiB); object tier "
                f"complete {fmt(row.get('object_tier_wait_s'))} s after the last cold pull ended, "
                f"{fmt(row.get('object_tier_objects'))} objects, {fmt(row.get('object_tier_mib'))} MiB")
        if row.get("object_tier_missing"):
            note += f", {row['object_tier_missing']} image blobs MISSING"
        if "warm_local_refill_mib" in row:
            note += f"; local tiers refilled by the warm pull: {fmt(row['warm_local_refill_mib'])} MiB"
        extra.append(note + ".")
    out.append("")
    out.extend(extra)
    return "\n".join(out) + "\n", ratios


def main():
    tsv, out_dir = sys.argv[1], sys.argv[2]
    meta, peers = load(tsv)
    order = [p for p in ("gantry", "distribution") if p in peers] + sorted(
        p for p in peers if p not in ("gantry", "distribution"))
    text, ratios = markdown(meta, peers, order)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "cluster.json"), "w") as f:
        json.dump({"meta": meta, "peers": peers, "gantry_advantage": ratios}, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "cluster.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
