# scripts/bench.d/h2.sh: HTTP/2 and idle connections, part of scripts/bench's default scenario.
# Sourced by scripts/bench after the warm load (the peers are up with the tag and blobs cached) and
# before the callgrind and cold single-blob phases. Uses its helpers (say, die, start, stop,
# wait_http, record, cpu_ticks, mem_kib, sample_quiet, url_of, profile_start/stop).
#
#   h2   h2load, BENCH_H2_CONNS (8) connections x BENCH_H2_STREAMS (32) streams, BENCH_DURATION
#        seconds, for the manifest by tag and the 1 MiB blob, over h2c (prior knowledge) and TLS
#        (ALPN h2), against gantry and nginx (`listen ... http2`, its own h2c and TLS ports beside
#        the h1 one, same cache). gantry serves h2c on its one port; for TLS it is restarted on the
#        same store with `tls:` (a self-signed certificate made here), then restarted plain.
#        Median of BENCH_REPEAT runs; req/s and the server's CPU per request.
#   idle BENCH_IDLE_CONNS (1,000) keep-alive connections that each made one request, then sit:
#        the server's RSS with them held minus its RSS before they opened (gantry and nginx,
#        master + workers).
# distribution is left out of both: issue 16 compares gantry with nginx here, and distribution
# speaks h2 only over TLS.

H2_CONNS=${BENCH_H2_CONNS:-8}
H2_STREAMS=${BENCH_H2_STREAMS:-32}
IDLE_CONNS=${BENCH_IDLE_CONNS:-1000}

# h2_url PEER KEY MODE(h2c|tls): where h2load sends KEY's request for PEER.
h2_url() {
  local port path
  path=$(url_of "$1" "$2" | sed 's|^http://[^/]*||')
  case $1:$3 in
    gantry:h2c) port=${PORT_OF[gantry]} ;;
    gantry:tls) port=$GANTRY_TLS_PORT ;;
    nginx:h2c) port=$NGINX_H2C_PORT ;;
    nginx:tls) port=$NGINX_TLS_PORT ;;
  esac
  if [ "$3" = tls ]; then echo "https://127.0.0.1:$port$path"; else echo "http://127.0.0.1:$port$path"; fi
}

# h2_once PEER KEY MODE ROUND: one h2load run, one line to $WORK/h2/PEER-KEY-MODE.tsv:
# req/s, server CPU µs per request, failed requests.
h2_once() {
  local peer=$1 key=$2 mode=$3 round=$4 header=() ticks0 ticks1 out rps done_ failed
  [ "$key" = tag ] && header=(-H "accept: $ACCEPT")
  sample_quiet
  profile_start "$peer" "h2-$key-$mode-$round"
  ticks0=$(cpu_ticks "${PIDS[$peer]}")
  out=$(timeout $((DURATION + 60)) h2load -t1 -c"$H2_CONNS" -m"$H2_STREAMS" -D"$DURATION" \
    "${header[@]}" "$(h2_url "$peer" "$key" "$mode")" 2>&1) || die "h2load failed ($peer $key $mode): $out"
  ticks1=$(cpu_ticks "${PIDS[$peer]}")
  profile_stop
  echo "$out" >>"$WORK/logs/h2load-$peer.log"
  rps=$(awk '/^finished in/ {gsub(",", "", $4); print $4}' <<<"$out")
  read -r done_ failed < <(awk '/^requests:/ {print $8, $10}' <<<"$out")
  [ -n "$rps" ] && [ -n "$done_" ] || die "h2load printed no summary ($peer $key $mode): $out"
  # h2load says which protocol it spoke; anything but h2 would measure something else.
  grep -q '^Application protocol: h2' <<<"$out" || die "h2load did not speak h2 to $peer ($mode): $out"
  local cpu_us
  cpu_us=$($PY -c "import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / float(sys.argv[3]) * 1e6 / max(int(sys.argv[4]), 1), 2))" \
    "$ticks0" "$ticks1" "$CLK_TCK" "$done_")
  printf '%s\t%s\t%s\n' "$rps" "$cpu_us" "$failed" >>"$WORK/h2/$peer-$key-$mode.tsv"
  say "  $peer $key over $mode, round $round: $rps req/s, server $cpu_us µs CPU/request, $failed failed"
}

h2_summarize() { # PEER KEY MODE
  local rps cpu failed all
  read -r rps cpu failed all < <($PY - "$WORK/h2/$1-$2-$3.tsv" <<'EOF2'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]) if line.strip()]
rps = [float(r[0]) for r in rows]
print(round(statistics.median(rps), 1), statistics.median(float(r[1]) for r in rows),
      sum(int(r[2]) for r in rows), ",".join(str(round(v, 1)) for v in rps))
EOF2
  )
  record "$1" "h2_${2}_${3}_rps" "$rps"
  record "$1" "h2_${2}_${3}_cpu_us" "$cpu"
  record "$1" "h2_${2}_${3}_errors" "$failed"
  record "$1" "h2_${2}_${3}_rps_samples" "$all"
}

# gantry_tls on|off: restarts gantry on its store, with TLS on a port of its own or plain as before.
gantry_tls() {
  stop gantry
  if [ "$1" = on ]; then
    GANTRY_TLS_PORT=$(free_port)
    sed "s|^listen: .*|listen: 127.0.0.1:$GANTRY_TLS_PORT|" "$WORK/gantry/gantry.yaml" >"$WORK/gantry/gantry-tls.yaml"
    printf 'tls:\n  cert: %s\n  key: %s\n' "$TLS_DIR/cert.pem" "$TLS_DIR/key.pem" >>"$WORK/gantry/gantry-tls.yaml"
    start gantry "$WORK/logs/gantry-tls.log" "$GANTRY_BIN" serve --config "$WORK/gantry/gantry-tls.yaml"
    for _ in $(seq 1 200); do
      curl -sk -o /dev/null "https://127.0.0.1:$GANTRY_TLS_PORT/v2/" && break
      sleep 0.1
    done
  else
    start gantry "$WORK/logs/gantry-plain.log" "$GANTRY_BIN" serve --config "$WORK/gantry/gantry.yaml"
    wait_http "http://127.0.0.1:${PORT_OF[gantry]}/v2/" gantry
  fi
}

h2_phase() {
  local peers=() peer mode key round
  for peer in gantry nginx; do
    [[ " $PEERS " == *" $peer "* ]] && peers+=("$peer")
  done
  [ ${#peers[@]} -gt 0 ] || return 0
  if ! command -v h2load >/dev/null 2>&1; then
    say "no h2load (apt-get install nghttp2-client): HTTP/2 not measured"
    return 0
  fi
  mkdir -p "$WORK/h2"
  say "== HTTP/2: h2load -c$H2_CONNS -m$H2_STREAMS, ${DURATION} s, $REPEAT rounds (h2c, then TLS)"
  for mode in h2c tls; do
    if [ "$mode" = tls ] && [[ " ${peers[*]} " == *" gantry "* ]]; then
      gantry_tls on
      # The restart emptied the tag cache: one request refills it before the runs.
      [ "$(curl -sk -o /dev/null -w '%{http_code}' -H "Accept: $ACCEPT" "$(h2_url gantry tag tls)")" = 200 ] ||
        die "gantry over TLS does not answer the tag"
    fi
    for round in $(seq 1 "$REPEAT"); do
      for key in tag blob1m; do
        for peer in "${peers[@]}"; do
          h2_once "$peer" "$key" "$mode" "$round"
        done
      done
    done
  done
  if [[ " ${peers[*]} " == *" gantry "* ]]; then
    gantry_tls off
  fi
  for peer in "${peers[@]}"; do
    for mode in h2c tls; do
      for key in tag blob1m; do
        h2_summarize "$peer" "$key" "$mode"
      done
    done
  done
}

idle_phase() {
  local peer before held
  say "== $IDLE_CONNS idle keep-alive connections"
  for peer in gantry nginx; do
    [[ " $PEERS " == *" $peer "* ]] || continue
    before=$(mem_kib VmRSS "${PIDS[$peer]}")
    # The holder opens the connections, makes one request on each, reports, then waits for a
    # line on stdin (or 60 s) before it closes them all.
    coproc HOLDER { $PY "$HERE/idle-connections.py" "${PORT_OF[$peer]}" "$IDLE_CONNS"; }
    local line=""
    read -r -t 120 line <&"${HOLDER[0]}" || true
    [ "${line%% *}" = held ] || { kill "$HOLDER_PID" 2>/dev/null || true; die "idle connections to $peer: ${line:-no answer}"; }
    sleep 2
    held=$(mem_kib VmRSS "${PIDS[$peer]}")
    echo >&"${HOLDER[1]}"
    wait "$HOLDER_PID" 2>/dev/null || true
    record "$peer" idle_conns_rss_mib "$($PY -c "import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / 1024, 1))" "$before" "$held")"
    say "  $peer: RSS $((before / 1024)) MiB before, $((held / 1024)) MiB with $IDLE_CONNS idle connections ($line)"
  done
}
