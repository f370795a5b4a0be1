# scripts/bench.d/wan.sh: the WAN scenario of scripts/bench (`scripts/bench wan`, or
# BENCH_SCENARIO=wan). Sourced by scripts/bench after its helpers (say, die, start, stop,
# wait_http, free_port, sample_quiet, registry_config) and its clean-up trap.
#
# The upstream (Debian's docker-registry) runs in a network namespace of its own, reached through
# a second namespace that forwards and shapes (veth pairs of their own, 10.213.X.0/29, X picked
# unused): by default 20 ms each way (40 ms RTT) at 200 Mbit/s each way, with tc netem where the
# kernel has it, else tc tbf and a delay line of ours (see "The link" below). gantry, nginx and
# distribution run in the root namespace, configured by scripts/bench's own start_peer with the
# upstream's address; the clients (skopeo, curl) talk to them on 127.0.0.1. Nothing else on the
# network is touched. Per peer, each with its own upstream process (whose access log counts what
# that peer asked):
#   cold1   a cold pull of the 10-layer image by 1 skopeo client: wall time, upstream requests/bytes;
#   seq1    a fresh peer, one client (curl) that fetches the manifest, then each blob in turn;
#   cold8   cold1 by BENCH_CLIENTS (8) clients at once, on a fresh peer with an empty cache;
#   tags    one tag that no one asked for yet, GET by the Accept headers of dockerd, containerd and
#           skopeo, one after the other inside the TTL: upstream manifest GETs;
#   break   a fresh peer behind a fault proxy in the upstream's namespace (wan-break.py) that
#           resets the peer's first download of one blob at 80%; a curl client retries with Range
#           (as dockerd resumes) until it holds the whole blob: time to complete, bytes the upstream
#           sent again after the cut.
# Everything made here (namespaces, veth pairs, qdiscs, rules, processes, temp dir) is removed at
# exit, on Ctrl-C and on failure. Not root, or no `ip netns` / tc / iptables: says why, exits 0.
# Results: $BENCH_OUT/wan/results.json and results.md (scripts/bench.d/wan-report.py).
#
# Environment, beside scripts/bench's (BENCH_SCALE, BENCH_CLIENTS, BENCH_OUT, BENCH_STEP_TIMEOUT...):
#   BENCH_WAN_LAYERS     the 10 layer sizes (full: 4-16 MiB, 98 MiB in all; small: 1-4 MiB, 23 MiB)
#   BENCH_WAN_BREAK_BLOB the blob cut at 80% (full 64M, small 16M)
#   BENCH_WAN_BREAK_AT=0.8
#   BENCH_WAN_DELAY=20   ms each way, so the RTT is twice that
#   BENCH_WAN_RATE=200mbit each way
#   BENCH_WAN_LOSS       e.g. 0.1% each way; none by default
#   BENCH_WAN_SHAPER=auto|netem|delayline   netem when the kernel has it (auto), else the delay line

case $SCALE in
  full) w_layers=16M,4M,12M,8M,16M,6M,10M,4M,14M,8M w_break=64M ;;
  *) w_layers=4M,1M,3M,2M,4M,1M,2M,3M,1M,2M w_break=16M ;;
esac
WAN_LAYERS=${BENCH_WAN_LAYERS:-$w_layers}
WAN_BREAK_BLOB=${BENCH_WAN_BREAK_BLOB:-$w_break}
WAN_BREAK_AT=${BENCH_WAN_BREAK_AT:-0.8}
WAN_DELAY=${BENCH_WAN_DELAY:-20}
WAN_SHAPER=${BENCH_WAN_SHAPER:-auto}
WAN_RATE=${BENCH_WAN_RATE:-200mbit}
WAN_LOSS=${BENCH_WAN_LOSS:-}
WOUT=$OUT/wan
WRESULTS=$WORK/wan.tsv
: >"$WRESULTS"
wrecord() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$WRESULTS"; }
json_get() { $PY -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
mib() { $PY -c "import sys; print(round(int(sys.argv[1]) / 2**20, 2))" "$1"; }

# ---------------------------------------------------------------------------------------------
# The link: two namespaces, two veth pairs, the shaping; their removal.
#
#   root ns (peers, clients)  WAN_A ==veth== WAN_B  link ns  WAN_C ==veth== WAN_D  upstream ns
#        10.213.X.1                     10.213.X.2          10.213.X.5          10.213.X.6
#
# The link namespace forwards between the two and does all the shaping, on both of its egresses:
# tc netem where the kernel has it; else tc tbf (the rate) and the delay line (wan-delay.py, via an
# NFQUEUE rule on its FORWARD chain: the latency, each direction once). The VM this was written on
# has no sch_netem (CONFIG_NET_SCH_NETEM is not set, no modules), so its runs use the delay line.
# The shaping sits on a hop of its own, not on the senders' interfaces, because a sender-side
# queue that holds packets for 20 ms throttles TCP through its small-queues limit (the skbs still
# count against the socket: 0.25 MB/s measured that way); forwarded packets are no longer the
# socket's.
WAN_NS=gantry-bench-wan-$$
WAN_LINK_NS=gantry-bench-wan-link-$$
WAN_A=gbw$$a WAN_B=gbw$$b WAN_C=gbw$$c WAN_D=gbw$$d
WAN_MADE=0

wan_skip() {
  say "wan scenario skipped: $*"
  exit 0
}
[ "$(id -u)" = 0 ] || wan_skip "it needs root (network namespaces, veth pairs, tc, iptables)"
command -v tc >/dev/null 2>&1 || wan_skip "no tc (apt-get install iproute2)"
command -v iptables >/dev/null 2>&1 || wan_skip "no iptables (apt-get install iptables)"
ip netns add "$WAN_NS" 2>"$WORK/logs/netns.log" || wan_skip "ip netns add failed: $(cat "$WORK/logs/netns.log")"
WAN_MADE=1
ip netns add "$WAN_LINK_NS"

# Stops what runs in the namespaces (all of it started here), deletes the veth pairs (their ends
# in the namespaces, the qdiscs and the root namespace's route go with them) and the namespaces
# (whose iptables rules go with them). Then scripts/bench's own clean-up (processes, temp dir).
wan_teardown() {
  local status=$? name pid ns
  set +e # every step runs, whatever failed before; `(exit $status)` hands cleanup the status
  for name in "${!PIDS[@]}"; do
    case $name in
      up-wan-* | break-* | delay) stop "$name" ;;
    esac
  done
  if [ "$WAN_MADE" = 1 ]; then
    for ns in "$WAN_NS" "$WAN_LINK_NS"; do
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    done
    ip link del "$WAN_A" 2>/dev/null || true
    ip -n "$WAN_LINK_NS" link del "$WAN_C" 2>/dev/null || true
    ip netns del "$WAN_NS" 2>/dev/null || true
    ip netns del "$WAN_LINK_NS" 2>/dev/null || true
    WAN_MADE=0
  fi
  (exit "$status")
  cleanup
}
trap wan_teardown EXIT
# Ctrl-C: bash drops a SIGINT that came while it waited for a foreground command which then exited
# normally (its "wait and cooperative exit" rule; `$(curl ... || true)` does that, and so does
# python's own SIGINT handling), and the run would go on. This watcher (SIGINT is ignored in
# background jobs, so it installs its own handler) turns the terminal's SIGINT into a SIGTERM for
# this shell, whose trap always runs.
$PY -c 'import os, signal, sys
signal.signal(signal.SIGINT, lambda *_: (os.kill(int(sys.argv[1]), signal.SIGTERM), sys.exit(0)))
signal.pause()' "$$" &
PIDS[int-watch]=$!

# A /29 in 10.213.0.0/16 that no interface or route here uses yet.
WAN_NET=
for offset in $(seq 0 254); do
  x=$((($$ + offset) % 255))
  if ! ip -4 addr show | grep -q "inet 10\.213\.$x\." && ! ip -4 route show | grep -q "^10\.213\.$x\."; then
    WAN_NET=10.213.$x
    break
  fi
done
[ -n "$WAN_NET" ] || die "no free 10.213.X.0/29 for the veth pairs"
UHOST=$WAN_NET.6

ip link add "$WAN_A" type veth peer name "$WAN_B" netns "$WAN_LINK_NS"
ip -n "$WAN_LINK_NS" link add "$WAN_C" type veth peer name "$WAN_D" netns "$WAN_NS"
ip addr add "$WAN_NET.1/30" dev "$WAN_A"
ip link set "$WAN_A" up
ip route add "$WAN_NET.4/30" via "$WAN_NET.2" dev "$WAN_A"
ip -n "$WAN_LINK_NS" addr add "$WAN_NET.2/30" dev "$WAN_B"
ip -n "$WAN_LINK_NS" addr add "$WAN_NET.5/30" dev "$WAN_C"
ip -n "$WAN_LINK_NS" link set "$WAN_B" up
ip -n "$WAN_LINK_NS" link set "$WAN_C" up
ip netns exec "$WAN_LINK_NS" sysctl -qw net.ipv4.ip_forward=1
ip -n "$WAN_NS" addr add "$UHOST/30" dev "$WAN_D"
ip -n "$WAN_NS" link set "$WAN_D" up
ip -n "$WAN_NS" link set lo up
ip -n "$WAN_NS" route add "$WAN_NET.0/30" via "$WAN_NET.5" dev "$WAN_D"
if [ -n "$WAN_LOSS" ]; then
  # Loss is per packet the delay line sees: one segment each, not a GSO burst of 40.
  ip link set "$WAN_A" gso_max_segs 1
  ip -n "$WAN_NS" link set "$WAN_D" gso_max_segs 1
fi
# The shaping, on both egresses of the link namespace: netem (delay, rate, loss) if the kernel has
# it; else tbf (the rate, a queue of up to 100 ms) and the delay line (every forwarded packet
# waits in it; it drops the loss).
if [ "$WAN_SHAPER" != delayline ] &&
  tc -n "$WAN_LINK_NS" qdisc add dev "$WAN_B" root netem delay "${WAN_DELAY}ms" rate "$WAN_RATE" limit 100000 \
    ${WAN_LOSS:+loss "$WAN_LOSS"} 2>"$WORK/logs/netem.log"; then
  tc -n "$WAN_LINK_NS" qdisc add dev "$WAN_C" root netem delay "${WAN_DELAY}ms" rate "$WAN_RATE" limit 100000 \
    ${WAN_LOSS:+loss "$WAN_LOSS"}
  WAN_SHAPER=netem
else
  [ "$WAN_SHAPER" = netem ] && die "BENCH_WAN_SHAPER=netem, but tc netem fails here: $(cat "$WORK/logs/netem.log")"
  WAN_SHAPER=delayline
  tc -n "$WAN_LINK_NS" qdisc add dev "$WAN_B" root tbf rate "$WAN_RATE" burst 256k latency 100ms
  tc -n "$WAN_LINK_NS" qdisc add dev "$WAN_C" root tbf rate "$WAN_RATE" burst 256k latency 100ms
  ip netns exec "$WAN_LINK_NS" iptables -t mangle -A FORWARD -j NFQUEUE --queue-num 0
  ip netns exec "$WAN_LINK_NS" $PY -u "$HERE/wan-delay.py" 0 "$WAN_DELAY" "$WAN_LOSS" >"$WORK/logs/delay.log" 2>&1 &
  PIDS[delay]=$!
  for _ in $(seq 1 100); do
    grep -qx bound "$WORK/logs/delay.log" && break
    kill -0 "${PIDS[delay]}" 2>/dev/null || die "the delay line exited: $(cat "$WORK/logs/delay.log")"
    sleep 0.1
  done
  grep -qx bound "$WORK/logs/delay.log" || die "the delay line did not bind its queue"
fi
WAN_SHAPE="$WAN_SHAPER: ${WAN_DELAY} ms and $WAN_RATE each way${WAN_LOSS:+, loss $WAN_LOSS each way}"
say "wan: namespaces $WAN_LINK_NS (shaping: $WAN_SHAPE) and $WAN_NS (upstream $UHOST)"

# Proof that the shaping is in effect: the RTT over the link (the time curl takes to connect to
# the upstream, one SYN/SYN-ACK round trip: there is no ping here), one blob straight from the
# upstream (the rate), and after the run, what the link's qdiscs sent and how many packets the
# delay line held.
wan_rtt_ms() { # PORT: the median connect time of 5 connections, in ms
  local i times=()
  for i in 1 2 3 4 5; do
    times+=("$(curl -s -o /dev/null -w '%{time_connect}' --max-time 10 "http://$UHOST:$1/v2/" || echo nan)")
  done
  $PY -c "import statistics, sys; print(round(statistics.median(map(float, sys.argv[1:])) * 1000, 1))" "${times[@]}"
}

# ---------------------------------------------------------------------------------------------
# scripts/bench's own peers, pointed at the veth address: its start_peer and stop_peer, with the
# upstream host 127.0.0.1 replaced by $UHOST (the only change), so the peers' configurations are
# exactly the default run's.
bench_function() { # NAME: the text of scripts/bench's function NAME
  # It ends at the first line `}` after which the text parses (heredocs inside have such lines).
  local text
  text=$($PY - "$ROOT/scripts/bench" "$1" <<'EOF'
import subprocess, sys
lines, name = open(sys.argv[1]).read().split("\n"), sys.argv[2]
start = next(i for i, line in enumerate(lines) if line.startswith(name + "() {"))
for end in range(start + 1, len(lines)):
    if lines[end] == "}":
        text = "\n".join(lines[start:end + 1])
        if subprocess.run(["bash", "-n"], input=text.encode(), capture_output=True).returncode == 0:
            print(text)
            break
EOF
  )
  [ -n "$text" ] || die "scripts/bench has no function $1"
  printf '%s\n' "$text"
}
eval "$(bench_function start_peer | sed 's/127\.0\.0\.1:\$UPORT/$UHOST:$UPORT/g')"
eval "$(bench_function stop_peer)"
[ "$(declare -f start_peer | grep -c 'UHOST:\$UPORT')" -ge 3 ] ||
  die "scripts/bench's start_peer no longer names its upstream 127.0.0.1:\$UPORT for all three peers"

# The upstream of PEER: its own docker-registry in the namespace, on port BASE + N, over the
# shared storage; its stdout is the access log.
declare -A UPORT_OF=() UPLOG_OF=() PORT_OF=()
wan_upstream() { # PEER N
  local peer=$1 port=$((5000 + $2))
  registry_config "up-$peer" "$port" "$SHARED" true | sed "s/^  addr: 127\.0\.0\.1:/  addr: $UHOST:/" >"$WORK/upstream-wan-$peer.yml"
  UPLOG_OF[$peer]=$WORK/logs/upstream-wan-$peer.access.log
  UPORT_OF[$peer]=$port
  : >"${UPLOG_OF[$peer]}"
  ip netns exec "$WAN_NS" docker-registry serve "$WORK/upstream-wan-$peer.yml" >"${UPLOG_OF[$peer]}" 2>"$WORK/logs/up-wan-$peer.log" &
  PIDS[up-wan-$peer]=$!
  wait_http "http://$UHOST:$port/v2/" "up-wan-$peer"
}

wan_peer_up() { # PEER [UPSTREAM_PORT]: a fresh peer (empty cache) in front of its upstream
  UPORT=${2:-${UPORT_OF[$1]}}
  start_peer "$1"
  PORT_OF[$1]=$PORT
}

upstream_count() { # PEER FROM_LINE
  sleep 0.5 # distribution logs a request when it completes
  $PY "$HERE/upstream-log.py" "${UPLOG_OF[$1]}" "$2"
}
mark_of() { wc -l <"${UPLOG_OF[$1]}"; }

# cold_pulls PEER N SCENARIO: N concurrent skopeo pulls of bench/big:v1; records wall and upstream.
cold_pulls() {
  local peer=$1 n=$2 key=$3 mark t0 t1 pids=() failed=0 i up wall
  sample_quiet
  mark=$(mark_of "$peer")
  t0=$(now)
  for i in $(seq 1 "$n"); do
    timeout "$STEP_TIMEOUT" skopeo --insecure-policy copy --quiet --src-tls-verify=false --retry-times=0 \
      "docker://127.0.0.1:${PORT_OF[$peer]}/bench/big:v1" "dir:$PULL/wan-$peer-$key-$i" \
      >"$WORK/logs/pull-wan-$peer-$key-$i.log" 2>&1 &
    pids+=($!)
    PIDS[pull-$i]=$!
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=$((failed + 1))
    unset "PIDS[pull-$((i + 1))]"
  done
  t1=$(now)
  rm -rf "$PULL/wan-$peer-$key"-*
  [ "$failed" = 0 ] || die "$failed of $n $key pulls from $peer failed: $(tail -5 "$WORK/logs/pull-wan-$peer-$key-1.log")"
  up=$(upstream_count "$peer" "$mark")
  wall=$(elapsed "$t0" "$t1")
  wrecord "$peer" "${key}_wall_s" "$wall"
  wrecord "$peer" "${key}_upstream_requests" "$(json_get "$up" requests)"
  wrecord "$peer" "${key}_upstream_blob_gets" "$(json_get "$up" blob_gets)"
  wrecord "$peer" "${key}_upstream_mib" "$(mib "$(json_get "$up" get_bytes)")"
  say "  $peer $key ($n client(s)): $wall s; upstream $up"
}

# sequential_pull PEER KEY: a client that leaves the link idle between blobs, as dockerd with
# `max-concurrent-downloads: 1` does: the manifest, then the config and each layer one after the
# other on one connection (curl), each in full before the next is asked for. Where prefetch helps.
sequential_pull() {
  local peer=$1 key=$2 mark t0 t1 base manifest up wall args=() digest
  sample_quiet
  mark=$(mark_of "$peer")
  base=http://127.0.0.1:${PORT_OF[$peer]}/v2/bench/big
  t0=$(now)
  manifest=$(curl -sf --max-time "$STEP_TIMEOUT" -H "Accept: application/vnd.oci.image.manifest.v1+json" \
    "$base/manifests/v1") || die "$key: the manifest from $peer"
  for digest in $($PY -c "
import json, sys
m = json.loads(sys.argv[1])
print(' '.join([m['config']['digest']] + [l['digest'] for l in m['layers']]))" "$manifest"); do
    args+=(-o /dev/null "$base/blobs/$digest")
  done
  timeout "$STEP_TIMEOUT" curl -sfL "${args[@]}" || die "$key: a blob from $peer failed"
  t1=$(now)
  up=$(upstream_count "$peer" "$mark")
  wall=$(elapsed "$t0" "$t1")
  wrecord "$peer" "${key}_wall_s" "$wall"
  wrecord "$peer" "${key}_upstream_blob_gets" "$(json_get "$up" blob_gets)"
  say "  $peer $key (1 client, one blob at a time): $wall s; upstream $up"
}

# The Accept headers of the three clients' manifest GET by tag: dockerd (moby's distribution
# client, one header per type), containerd (its resolver) and skopeo (containers/image).
ACCEPT_DOCKERD=(-H "Accept: application/vnd.docker.distribution.manifest.v2+json"
  -H "Accept: application/vnd.docker.distribution.manifest.list.v2+json"
  -H "Accept: application/vnd.oci.image.index.v1+json"
  -H "Accept: application/vnd.oci.image.manifest.v1+json")
ACCEPT_CONTAINERD=(-H "Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*")
ACCEPT_SKOPEO=(-H "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.v1+prettyjws, application/vnd.docker.distribution.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json")

tag_burst() { # PEER: bench/tags:v1, never asked for before, once per client type
  local peer=$1 mark code client gets up
  local -a accept
  sample_quiet
  mark=$(mark_of "$peer")
  for client in dockerd containerd skopeo; do
    case $client in
      dockerd) accept=("${ACCEPT_DOCKERD[@]}") ;;
      containerd) accept=("${ACCEPT_CONTAINERD[@]}") ;;
      skopeo) accept=("${ACCEPT_SKOPEO[@]}") ;;
    esac
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time "$STEP_TIMEOUT" "${accept[@]}" \
      "http://127.0.0.1:${PORT_OF[$peer]}/v2/bench/tags/manifests/v1" || true)
    [ "$code" = 200 ] || die "tag GET from $peer as $client answered $code"
  done
  up=$(upstream_count "$peer" "$mark")
  gets=$(tail -n +"$((mark + 1))" "${UPLOG_OF[$peer]}" | grep -c '"GET /v2/[^ ]*/manifests/' || true)
  wrecord "$peer" tags_upstream_manifest_gets "$gets"
  wrecord "$peer" tags_upstream_manifest_requests "$(json_get "$up" manifest_requests)"
  wrecord "$peer" tags_upstream_requests "$(json_get "$up" requests)"
  say "  $peer tag burst (dockerd, containerd, skopeo): $gets upstream manifest GETs; upstream $up"
}

# break_download PEER N: a fresh peer whose upstream is the fault proxy (port 6000 + N, in the
# namespace, relaying to the peer's upstream); curl fetches the break blob through the peer,
# resuming with Range after a failure (5 attempts at most), until it holds the whole blob.
break_download() {
  local peer=$1 port=$((6000 + $2)) log=$WORK/logs/break-$peer.jsonl file=$PULL/wan-break-$peer
  local attempts=0 t0 t1 have code digest range statuses=() intact=1
  : >"$log"
  ip netns exec "$WAN_NS" $PY -u "$HERE/wan-break.py" "$UHOST" "$port" "$UHOST" "${UPORT_OF[$peer]}" \
    "$BREAK_DIGEST" "$BREAK_SIZE" "$WAN_BREAK_AT" "$log" >"$WORK/logs/break-$peer.log" 2>&1 &
  PIDS[break-$peer]=$!
  for _ in $(seq 1 100); do
    grep -q listening "$WORK/logs/break-$peer.log" 2>/dev/null && break
    kill -0 "${PIDS[break-$peer]}" 2>/dev/null || die "the fault proxy exited: $(cat "$WORK/logs/break-$peer.log")"
    sleep 0.1
  done
  stop_peer "$peer"
  wan_peer_up "$peer" "$port"
  sample_quiet
  rm -f "$file"
  t0=$(now)
  while [ "$attempts" -lt 5 ]; do
    attempts=$((attempts + 1))
    have=$(stat -c %s "$file" 2>/dev/null || echo 0)
    range=()
    [ "$have" -gt 0 ] && range=(-H "Range: bytes=$have-")
    code=$(curl -s -o "$file.part" -w '%{http_code}' --max-time "$STEP_TIMEOUT" "${range[@]}" \
      "http://127.0.0.1:${PORT_OF[$peer]}/v2/bench/break/blobs/$BREAK_DIGEST" 2>/dev/null || true)
    statuses+=("$code")
    case $code in
      206) cat "$file.part" >>"$file" ;;
      200) mv "$file.part" "$file" ;; # the whole blob from the start (a Range ignored), maybe cut
    esac
    rm -f "$file.part"
    [ "$(stat -c %s "$file" 2>/dev/null || echo 0)" -ge "$BREAK_SIZE" ] && break
  done
  t1=$(now)
  digest=sha256:$(sha256sum "$file" | cut -d' ' -f1)
  rm -f "$file"
  # Wrong bytes are a finding, not a failure of the benchmark: recorded, and the run goes on.
  if [ "$digest" != "$BREAK_DIGEST" ]; then
    intact=0
    say "  WARNING: the cut download from $peer ended with $digest after $attempts attempts (statuses ${statuses[*]}), not $BREAK_DIGEST"
  fi
  sleep 1 # distribution stores in the background after answering
  stop "break-$peer"
  local stats
  stats=$($PY - "$log" "$BREAK_DIGEST" "$BREAK_SIZE" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
digest, size = sys.argv[2], int(sys.argv[3])
gets = sorted((r for r in records if r["method"] == "GET" and digest in r["path"]), key=lambda r: r["seq"])
cut = next((r for r in gets if r["broken"]), None)
after = [r for r in gets if cut is not None and r["seq"] > cut["seq"]]
print(json.dumps({"broken": cut is not None, "cut_bytes": cut["bytes_down"] if cut else 0,
                  "refetch_bytes": sum(r["bytes_down"] for r in after), "refetch_gets": len(after),
                  "ranged": sum(1 for r in after if r["range"])}))
EOF
  )
  [ "$(json_get "$stats" broken)" = True ] || die "the fault proxy never cut $peer's download: $(cat "$log")"
  wrecord "$peer" break_wall_s "$(elapsed "$t0" "$t1")"
  wrecord "$peer" break_client_attempts "$attempts"
  wrecord "$peer" break_client_statuses "$(IFS=/; echo "${statuses[*]}")"
  wrecord "$peer" break_intact "$intact"
  wrecord "$peer" break_cut_mib "$(mib "$(json_get "$stats" cut_bytes)")"
  wrecord "$peer" break_refetch_mib "$(mib "$(json_get "$stats" refetch_bytes)")"
  wrecord "$peer" break_refetch_gets "$(json_get "$stats" refetch_gets)"
  wrecord "$peer" break_refetch_ranged "$(json_get "$stats" ranged)"
  wrecord "$peer" break_refetch_vs_rest "$($PY -c "import sys; print(round(int(sys.argv[1]) / (int(sys.argv[2]) - int(sys.argv[3])), 2))" \
    "$(json_get "$stats" refetch_bytes)" "$BREAK_SIZE" "$(json_get "$stats" cut_bytes)")"
  say "  $peer broken download: $(elapsed "$t0" "$t1") s, $attempts client attempt(s); proxy $stats"
}

# ---------------------------------------------------------------------------------------------
say "wan scenario: work dir $WORK; skopeo copies in $PULL"
SHARED=$WORK/upstream-storage
say "building OCI layout: image $WAN_LAYERS, tag image, break blob $WAN_BREAK_BLOB"
LAYOUT=$WORK/layout
$PY "$HERE/mkimage.py" "$LAYOUT" "v1=$WAN_LAYERS" "tags=64K" "break=$WAN_BREAK_BLOB" >"$WORK/images.json"
push_port=$(free_port)
registry_config push "$push_port" "$SHARED" false >"$WORK/push.yml"
start push "$WORK/logs/push.log" docker-registry serve "$WORK/push.yml"
wait_http "http://127.0.0.1:$push_port/v2/" push
for spec in v1:bench/big tags:bench/tags break:bench/break; do
  tag=${spec%%:*} repo=${spec#*:}
  timeout "$STEP_TIMEOUT" skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
    "oci:$LAYOUT:$tag" "docker://127.0.0.1:$push_port/$repo:v1" >>"$WORK/logs/push-skopeo.log" 2>&1 ||
    die "push of $repo failed: $(tail -5 "$WORK/logs/push-skopeo.log")"
done
stop push
rm -rf "$LAYOUT"
find "$SHARED" -type f -name data -exec cat {} + >/dev/null
read -r IMAGE_BLOBS IMAGE_BYTES BREAK_DIGEST BREAK_SIZE < <($PY -c "
import json, sys
images = json.load(open(sys.argv[1]))
v1, brk = images['v1'], images['break']['layers'][0]
print(1 + len(v1['layers']), v1['config_size'] + sum(l['size'] for l in v1['layers']), brk['digest'], brk['size'])" "$WORK/images.json")

# The link itself, before any peer: the RTT, and one blob straight from an upstream.
wan_upstream probe 0
WAN_RTT=$(wan_rtt_ms "${UPORT_OF[probe]}")
read -r code size seconds < <(curl -s -o /dev/null -w '%{http_code} %{size_download} %{time_total}\n' \
  --max-time "$STEP_TIMEOUT" "http://$UHOST:${UPORT_OF[probe]}/v2/bench/break/blobs/$BREAK_DIGEST" || true)
[ "$code" = 200 ] && [ "$size" = "$BREAK_SIZE" ] || die "the direct download over the link answered $code, $size bytes"
WAN_DIRECT=$($PY -c "import sys; print(round(int(sys.argv[1]) / float(sys.argv[2]) / 2**20, 1))" "$size" "$seconds")
say "wan: TCP connect to the upstream $WAN_RTT ms (one RTT); $(mib "$size") MiB straight from it: $seconds s, $WAN_DIRECT MiB/s"
stop up-wan-probe

read -r -a PEER_LIST <<<"$PEERS"
n=0
for peer in "${PEER_LIST[@]}"; do
  n=$((n + 1))
  say "== wan: $peer"
  wan_upstream "$peer" "$n"
  wan_peer_up "$peer"
  cold_pulls "$peer" 1 cold1
  stop_peer "$peer"
  wan_peer_up "$peer"
  sequential_pull "$peer" seq1
  stop_peer "$peer"
  wan_peer_up "$peer"
  cold_pulls "$peer" "$CLIENTS" cold8
  tag_burst "$peer"
  break_download "$peer" "$n"
  stop_peer "$peer"
  stop "up-wan-$peer"
done

qdisc_sent() { # DEV: bytes the link namespace's qdisc on DEV has sent
  tc -n "$WAN_LINK_NS" -s qdisc show dev "$1" | awk '/^ Sent/ {print $2; exit}'
}
# Packets the delay line held: the queue's id sequence (/proc/net/netfilter/nfnetlink_queue).
DELAYED=—
[ "$WAN_SHAPER" = delayline ] && DELAYED=$(ip netns exec "$WAN_LINK_NS" awk '$1 == 0 {print $8}' /proc/net/netfilter/nfnetlink_queue)
wan_upstream probe 0
RTT_AFTER=$(wan_rtt_ms "${UPORT_OF[probe]}")
stop up-wan-probe
{
  echo -e "meta\tscale\t$SCALE"
  echo -e "meta\tlayers\t$WAN_LAYERS"
  echo -e "meta\timage_blobs\t$IMAGE_BLOBS"
  echo -e "meta\timage_bytes\t$IMAGE_BYTES"
  echo -e "meta\tbreak_blob_bytes\t$BREAK_SIZE"
  echo -e "meta\tbreak_at\t$WAN_BREAK_AT"
  echo -e "meta\tclients\t$CLIENTS"
  echo -e "meta\tshaping\t$WAN_SHAPE"
  echo -e "meta\trtt_ms\t$WAN_RTT"
  echo -e "meta\trtt_after_ms\t$RTT_AFTER"
  echo -e "meta\tdelayed_packets\t$DELAYED"
  echo -e "meta\tdirect_mibps\t$WAN_DIRECT"
  echo -e "meta\tdown_qdisc_sent_mib\t$(mib "$(qdisc_sent "$WAN_B")")"
  echo -e "meta\tup_qdisc_sent_mib\t$(mib "$(qdisc_sent "$WAN_C")")"
  echo -e "meta\tquiet_samples\t$QUIET_SAMPLES"
  echo -e "meta\tbusy_samples\t$BUSY_SAMPLES"
  echo -e "meta\tmax_load\t$MAX_LOAD"
  if [[ " $PEERS " == *" gantry "* ]]; then
    echo -e "meta\tgantry_binary\t$GANTRY_BIN, built $(date -u -r "$GANTRY_BIN" +%Y-%m-%dT%H:%M:%SZ)"
  fi
  echo -e "meta\tdate\t$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo -e "meta\tcommit\t$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo " (src/ has uncommitted changes)")"
  echo -e "meta\tcpu\t$(nproc) x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo -e "meta\tversions\tnginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), distribution $(docker-registry --version | awk '{print $3}'), skopeo $(skopeo --version | awk '{print $3}'), $(uname -sr)"
} >>"$WRESULTS"
$PY "$HERE/wan-report.py" "$WRESULTS" "$WOUT"
say "results: $WOUT/results.json, $WOUT/results.md"
