# scripts/bench.d/callgrind.sh: `scripts/bench callgrind` (or BENCH_SCENARIO=callgrind), the A/B
# figure: instructions per warm request of gantry under valgrind's callgrind, which does not move
# with the machine's load as req/s does. Sourced by scripts/bench after its helpers (say, die,
# start, stop, wait_http, start_upstream, start_peer, prime, url_of, record) and its clean-up trap,
# with the bench images already pushed to the shared upstream storage.
#
# One gantry process under callgrind, its store and tag cache warmed by one request of each kind;
# then the counters are zeroed (callgrind_control --zero) and a fixed mix is sent over one
# keep-alive connection per kind, the counters dumped after each kind, so start-up, the cold
# misses and shutdown are not counted:
#   BENCH_CG_TAGS=2000    manifest-by-tag requests (the tag cache's hit path)
#   BENCH_CG_BLOBS=200    warm 1 MiB blob requests
# Only gantry's own instructions are counted (curl is not under valgrind). A debug build is fine
# for a relative figure (the binary this run uses, GANTRY_BIN, else target/debug/gantry); with
# BENCH_BUILD=1 the release build is measured. Results: $BENCH_OUT/callgrind.json, and the
# dumps in the work dir (BENCH_KEEP=1 keeps them, for callgrind_annotate).

CG_TAGS=${BENCH_CG_TAGS:-2000}
CG_BLOBS=${BENCH_CG_BLOBS:-200}
command -v valgrind >/dev/null 2>&1 && command -v callgrind_control >/dev/null 2>&1 ||
  die "scripts/bench callgrind needs valgrind (apt-get install valgrind)"

# requests KEY N: N GETs of KEY's URL over one connection, each checked for 200.
requests() {
  local key=$1 n=$2 header=() args=() codes
  [ "$key" = tag ] && header=(-H "Accept: $ACCEPT")
  for _ in $(seq 1 "$n"); do args+=(-o /dev/null "$(url_of gantry "$key")"); done
  codes=$(timeout "$STEP_TIMEOUT" curl -s -w '%{http_code}\n' "${header[@]}" "${args[@]}" | sort | uniq -c)
  [ "$codes" = "$(printf '%7d 200' "$n")" ] || die "$key under callgrind: status counts $codes (want $n x 200)"
}

# instructions FILE: the event total of one callgrind dump.
instructions() {
  awk '/^(summary|totals):/ {print $2; exit}' "$1"
}

start_upstream gantry
UPORT_OF[gantry]=$UPORT
start_peer gantry
PORT_OF[gantry]=$PORT
stop gantry
CG_OUT=$WORK/callgrind.out
say "== gantry under callgrind ($GANTRY_BIN): $CG_TAGS tags, $CG_BLOBS warm $SMALL_BLOB blobs"
start gantry "$WORK/logs/callgrind.log" valgrind --tool=callgrind --callgrind-out-file="$CG_OUT" \
  "$GANTRY_BIN" serve --config "$WORK/gantry/gantry.yaml"
CG_PID=${PIDS[gantry]}
wait_http "http://127.0.0.1:${PORT_OF[gantry]}/v2/" gantry
prime "$(url_of gantry tag)" "Accept: $ACCEPT"
prime "$(url_of gantry blob1m)"
# Twice: the first blob request is a miss whose commit ends after its last byte.
sleep 1
prime "$(url_of gantry blob1m)"

declare -A CG_IR=()
for spec in tag:$CG_TAGS blob1m:$CG_BLOBS; do
  key=${spec%%:*} n=${spec#*:}
  callgrind_control --zero "$CG_PID" >>"$WORK/logs/callgrind-control.log" 2>&1 ||
    die "callgrind_control --zero failed: $(tail -3 "$WORK/logs/callgrind-control.log")"
  requests "$key" "$n"
  callgrind_control --dump="$key" "$CG_PID" >>"$WORK/logs/callgrind-control.log" 2>&1 ||
    die "callgrind_control --dump failed: $(tail -3 "$WORK/logs/callgrind-control.log")"
  # Each dump is a file of its own, $CG_OUT.1, .2, ...
  dump=$(find "$WORK" -maxdepth 1 -name 'callgrind.out.*' | sort -V | tail -1)
  [ -n "$dump" ] && [ "$dump" != "${prev_dump:-}" ] || die "callgrind wrote no dump for $key"
  prev_dump=$dump
  ir=$(instructions "$dump")
  [ -n "$ir" ] || die "no event total in $dump"
  CG_IR[$key]=$ir
  say "  $key: $((ir / n)) instructions per request ($ir over $n)"
done
stop gantry
$PY - "$OUT/callgrind.json" "${CG_IR[tag]}" "$CG_TAGS" "${CG_IR[blob1m]}" "$CG_BLOBS" "$GANTRY_BIN" <<'EOF'
import json, sys
out, tag_ir, tags, blob_ir, blobs, binary = sys.argv[1:]
tag_ir, tags, blob_ir, blobs = int(tag_ir), int(tags), int(blob_ir), int(blobs)
report = {
    "binary": binary,
    "tag_requests": tags,
    "tag_instructions_per_request": tag_ir // tags,
    "blob1m_requests": blobs,
    "blob1m_instructions_per_request": blob_ir // blobs,
    "mix_instructions_per_request": (tag_ir + blob_ir) // (tags + blobs),
}
json.dump(report, open(out, "w"), indent=2)
print(json.dumps(report))
EOF
say "results: $OUT/callgrind.json"
