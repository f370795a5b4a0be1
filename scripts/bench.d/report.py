#!/usr/bin/env python3
"""Turns scripts/bench's measurements into results.json, results.md and (optionally) results.png.

Usage: report.py RESULTS_TSV OUT_DIR DRAW_CHART(0|1)
RESULTS_TSV holds lines `peer<TAB>key<TAB>value`; the peer `meta` describes the run.
"""
import json
import os
import sys

# key, label, unit, better ("higher" / "lower")
METRICS = [
    ("cold_wall_s", "cold pull, {clients} clients: wall time", "s", "lower"),
    ("cold_upstream_blob_gets", "cold pull: upstream blob GETs (image has {image_blobs} blobs)", "", "lower"),
    ("cold_upstream_mib", "cold pull: fetched from upstream (image is {image_mib} MiB)", "MiB", "lower"),
    ("cold_upstream_requests", "cold pull: upstream requests, all kinds", "", "lower"),
    ("warm_pull_s", "warm pull, 1 client: wall time", "s", "lower"),
    ("blob1m_rps", "warm 1 MiB blob GET", "req/s", "higher"),
    ("blob1m_mibps", "warm 1 MiB blob GET: throughput", "MiB/s", "higher"),
    ("blob100m_mibps", "warm {big_mib} MiB blob GET: throughput", "MiB/s", "higher"),
    ("tag_rps", "warm manifest by tag", "req/s", "higher"),
    ("blob1m_cpu_us", "warm 1 MiB blob GET: server CPU per request", "µs", "lower"),
    ("blob100m_cpu_us", "warm {big_mib} MiB blob GET: server CPU per request", "µs", "lower"),
    ("tag_cpu_us", "warm manifest by tag: server CPU per request", "µs", "lower"),
    ("tag_instructions", "warm manifest by tag: instructions per request (callgrind)", "", "lower"),
    ("blob1m_instructions", "warm 1 MiB blob GET: instructions per request (callgrind)", "", "lower"),
    ("h2_tag_h2c_rps", "manifest by tag over h2c ({h2})", "req/s", "higher"),
    ("h2_blob1m_h2c_rps", "1 MiB blob over h2c ({h2})", "req/s", "higher"),
    ("h2_tag_tls_rps", "manifest by tag over TLS h2 ({h2})", "req/s", "higher"),
    ("h2_blob1m_tls_rps", "1 MiB blob over TLS h2 ({h2})", "req/s", "higher"),
    ("h2_tag_h2c_cpu_us", "manifest by tag over h2c: server CPU per request", "µs", "lower"),
    ("h2_blob1m_h2c_cpu_us", "1 MiB blob over h2c: server CPU per request", "µs", "lower"),
    ("h2_tag_tls_cpu_us", "manifest by tag over TLS h2: server CPU per request", "µs", "lower"),
    ("h2_blob1m_tls_cpu_us", "1 MiB blob over TLS h2: server CPU per request", "µs", "lower"),
    ("idle_conns_rss_mib", "RSS added by {idle_conns} idle keep-alive connections", "MiB", "lower"),
    ("tag_upstream_per_1000", "upstream requests per 1,000 tag requests", "", "lower"),
    ("rss_cold_mib", "peak RSS through the cold pull", "MiB", "lower"),
    ("rss_warm_mib", "peak RSS through cold pull + warm load", "MiB", "lower"),
    ("huge_cold_mibps", "cold {huge_mib} MiB single blob, 1 client", "MiB/s", "higher"),
    ("huge_upstream_blob_gets", "cold {huge_mib} MiB blob: upstream blob GETs", "", "lower"),
    ("rss_huge_mib", "peak RSS, fresh process, cold {huge_mib} MiB blob", "MiB", "lower"),
]


def number(text):
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and "." not in text else value


def load(path):
    meta, peers = {}, {}
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) != 3:
                continue
            peer, key, value = parts
            if peer == "meta":
                meta[key] = number(value)
            elif key.endswith("_samples"):
                peers.setdefault(peer, {})[key] = [number(v) for v in value.split(",") if v]
            else:
                peers.setdefault(peer, {})[key] = number(value)
    return meta, peers


def gantry_advantage(gantry, other, better):
    """How many times better gantry is than `other` (>1: gantry better); None when undefined."""
    if not isinstance(gantry, (int, float)) or not isinstance(other, (int, float)):
        return None
    if better == "higher":
        return gantry / other if other else None
    return other / gantry if gantry else None


def fmt(value):
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:,}"


def targets(meta, peers):
    g = peers.get("gantry", {})
    n = peers.get("nginx", {})
    d = peers.get("distribution", {})

    def ratio(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    rows = []

    def add(name, measured, met):
        rows.append({"target": name, "measured": measured, "met": met})

    blobs = meta.get("image_blobs")
    gets = g.get("cold_upstream_blob_gets")
    add(f"cold pull: upstream blob GETs == blobs in the image ({blobs})", f"{gets}",
        None if gets is None else gets == blobs)
    gw, dw = g.get("cold_wall_s"), d.get("cold_wall_s")
    add("cold pull wall time <= distribution's",
        "—" if gw is None or dw is None else f"{fmt(gw)} s vs {fmt(dw)} s",
        None if gw is None or dw is None else gw <= dw)
    big_mib = round(meta.get("big_blob_bytes", 0) / 2**20)
    huge_mib = round(meta.get("huge_blob_bytes", 0) / 2**20)
    for key, label, want in (("blob1m_rps", "warm 1 MiB blob req/s >= 1.0x nginx", 1.0),
                             ("blob100m_mibps", f"warm {big_mib} MiB blob MiB/s >= 1.0x nginx", 1.0),
                             ("tag_rps", "manifest-by-tag req/s >= 1.5x nginx", 1.5),
                             ("huge_cold_mibps", f"cold {huge_mib} MiB single blob MiB/s >= 1.0x nginx", 1.0)):
        r = ratio(g.get(key), n.get(key))
        add(label, "—" if r is None else f"{r:.2f}x ({fmt(g.get(key))} vs {fmt(n.get(key))})",
            None if r is None else r >= want)
    for key, label in (("h2_tag_h2c_rps", "manifest by tag over h2c req/s >= 1.0x nginx"),
                       ("h2_blob1m_h2c_rps", "1 MiB blob over h2c req/s >= 1.0x nginx"),
                       ("h2_tag_tls_rps", "manifest by tag over TLS h2 req/s >= 1.0x nginx"),
                       ("h2_blob1m_tls_rps", "1 MiB blob over TLS h2 req/s >= 1.0x nginx")):
        r = ratio(g.get(key), n.get(key))
        add(label, "—" if r is None else f"{r:.2f}x ({fmt(g.get(key))} vs {fmt(n.get(key))})",
            None if r is None else r >= 1.0)
    v = g.get("idle_conns_rss_mib")
    add(f"{meta.get('idle_conns', 1000)} idle connections add <= 16 MiB of gantry RSS",
        "—" if v is None else f"{fmt(v)} MiB (nginx {fmt(n.get('idle_conns_rss_mib'))} MiB)",
        None if v is None else v <= 16)
    r = ratio(g.get("tag_rps"), d.get("tag_rps"))
    add("manifest-by-tag req/s >= 50x distribution",
        "—" if r is None else f"{r:.1f}x ({fmt(g.get('tag_rps'))} vs {fmt(d.get('tag_rps'))})",
        None if r is None else r >= 50)
    for key, label, limit in (("rss_cold_mib", "gantry peak RSS <= 40 MiB (cold 8-client pull)", 40),
                              ("rss_warm_mib", "gantry peak RSS <= 40 MiB (cold pull + warm load)", 40),
                              ("rss_huge_mib", "gantry peak RSS <= 64 MiB (cold single big blob)", 64)):
        v = g.get(key)
        add(label, "—" if v is None else f"{fmt(v)} MiB", None if v is None else v <= limit)
    return rows


def markdown(meta, peers, rows, order):
    others = [p for p in order if p != "gantry"]
    context = {
        "clients": meta.get("clients", "?"),
        "image_blobs": meta.get("image_blobs", "?"),
        "image_mib": round(meta.get("image_bytes", 0) / 2**20),
        "big_mib": round(meta.get("big_blob_bytes", 0) / 2**20),
        "huge_mib": round(meta.get("huge_blob_bytes", 0) / 2**20),
        "h2": meta.get("h2", "?"),
        "idle_conns": meta.get("idle_conns", "?"),
    }
    head = ["metric", "unit"] + order + [f"gantry vs {p}" for p in others if "gantry" in order]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, unit, better in METRICS:
        if not any(key in peers.get(p, {}) for p in order):
            continue
        cells = [label.format(**context), unit]
        for p in order:
            value = peers.get(p, {}).get(key)
            cell = fmt(value)
            errors = peers.get(p, {}).get(key.rsplit("_", 1)[0] + "_errors")
            if key.endswith(("_rps", "_mibps")) and errors:
                cell += f" ({errors} errors)"
            cells.append(cell)
        if "gantry" in order:
            for p in others:
                adv = gantry_advantage(peers.get("gantry", {}).get(key), peers.get(p, {}).get(key), better)
                cells.append("—" if adv is None else f"{adv:.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    out = ["## Results", ""]
    out.append(f"Run {meta.get('date', '?')} at commit {meta.get('commit', '?')}, scale `{meta.get('scale')}` "
               f"(image layers {meta.get('layers')}, blobs {meta.get('small_blob')} / {meta.get('big_blob')} / "
               f"{meta.get('huge_blob')}), {meta.get('cpu', '?')}; wrk {meta.get('wrk')}, "
               f"median of {meta.get('repeat', 1)} runs of {meta.get('duration_s')} s each; gantry log level `{meta.get('gantry_log')}`.")
    out.append(f"Versions: {meta.get('versions', '?')}.")
    busy = meta.get("busy_samples", 0)
    out.append(f"gantry binary: {meta.get('gantry_binary', '?')}.")
    out.append(("Machine was quiet (no cargo, rustc or test binary running) at every measurement"
                if not busy else
                f"NOT QUIET: cargo, rustc or test binaries were running at {busy} of "
                f"{busy + meta.get('quiet_samples', 0)} measurements")
               + f"; highest 1-minute load average at a measurement (the benchmark's own processes included): "
                 f"{meta.get('max_load', '?')}.")
    out.append("")
    out.append("`gantry vs X`: how many times better gantry is than X (above 1.00x gantry is better: faster, "
               "fewer upstream requests, less memory; — when undefined, e.g. a zero).")
    out.append("")
    out.extend(lines)
    out.append("")
    out.append("### Who limited the warm runs")
    out.append("")
    out.append("CPU in cores over each run (median of the runs; 1.00 is one core busy throughout), the server's "
               "processes (nginx: master and workers) and the load generator's. On 2 cores a client near 1.00 "
               "with a server below 1.00 measured the client, not the server; server CPU per request is the "
               "figure that holds either way.")
    out.append("")
    out.append("| scenario | " + " | ".join(f"{p}: server / client" for p in order) + " |")
    out.append("|---|" + "---|" * len(order))
    for key, label in (("blob1m", "1 MiB blob"), ("blob100m", f"{context['big_mib']} MiB blob"),
                       ("tag", "manifest by tag")):
        cells = [f"{fmt(peers.get(p, {}).get(key + '_server_cores'))} / "
                 f"{fmt(peers.get(p, {}).get(key + '_client_cores'))}" for p in order]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("### Targets")
    out.append("")
    out.append("| target | measured | met |")
    out.append("|---|---|---|")
    for row in rows:
        met = {True: "yes", False: "**no**", None: "not measured"}[row["met"]]
        out.append(f"| {row['target']} | {row['measured']} | {met} |")
    out.append("")
    return "\n".join(out)


def chart(meta, peers, order, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is not installed (apt-get install python3-matplotlib): no chart",
              file=sys.stderr)
        return False
    context = {
        "clients": meta.get("clients", "?"),
        "image_blobs": meta.get("image_blobs", "?"),
        "image_mib": round(meta.get("image_bytes", 0) / 2**20),
        "big_mib": round(meta.get("big_blob_bytes", 0) / 2**20),
        "huge_mib": round(meta.get("huge_blob_bytes", 0) / 2**20),
        "h2": meta.get("h2", "?"),
        "idle_conns": meta.get("idle_conns", "?"),
    }
    shown = [m for m in METRICS if any(isinstance(peers.get(p, {}).get(m[0]), (int, float)) for p in order)]
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 3.0))
    colors = {"gantry": "#2a7ab9", "nginx": "#3c9a4a", "distribution": "#d0782a"}
    for ax, (key, label, unit, better) in zip(axes.flat, shown):
        values = [peers.get(p, {}).get(key) for p in order]
        values = [v if isinstance(v, (int, float)) else 0 for v in values]
        bars = ax.bar(order, values, color=[colors.get(p, "#888888") for p in order])
        ax.set_title(f"{label.format(**context)}\n({unit + ', ' if unit else ''}{better} is better)", fontsize=8.5)
        ax.tick_params(labelsize=8)
        for bar, value in zip(bars, values):
            ax.annotate(fmt(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7.5)
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(f"gantry vs nginx proxy_cache vs distribution proxy (scale {meta.get('scale')}, "
                 f"{meta.get('date', '')})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def main():
    tsv, out_dir, draw = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    meta, peers = load(tsv)
    order = [p for p in ("gantry", "nginx", "distribution") if p in peers] + \
            [p for p in peers if p not in ("gantry", "nginx", "distribution")]
    rows = targets(meta, peers)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"meta": meta, "peers": peers, "targets": rows,
                   "metrics": [{"key": k, "label": l, "unit": u, "better": b} for k, l, u, b in METRICS]},
                  f, indent=1)
        f.write("\n")
    text = markdown(meta, peers, rows, order)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(text)
    print(text)
    png = os.path.join(out_dir, "results.png")
    if draw:
        if chart(meta, peers, order, png):
            print(f"chart: {png}", file=sys.stderr)
    else:
        print("chart skipped (BENCH_CHART=0)", file=sys.stderr)


if __name__ == "__main__":
    main()
