# scripts/bench.d/cluster.sh: the cluster scenario of scripts/bench (`scripts/bench cluster`, or
# BENCH_SCENARIO=cluster). Sourced by scripts/bench after its helpers (say, die, start, stop,
# wait_http, free_port, cpu_ticks, sample_quiet, registry_config) and its clean-up trap, so every
# process started here is stopped on exit like the default run's.
#
# Per peer (gantry, distribution), on 127.0.0.1 ephemeral ports: 3 replicas behind a plain
# round-robin nginx (no hashing), their own upstream registry (whose access log counts what the
# cluster asked it), one Garage (S3-compatible, single node) holding both peers' buckets, and one
# Redis (gantry's leases). Two phases each:
#   cold  BENCH_CLIENTS concurrent skopeo pulls through the nginx, every tier empty; counted until
#         the object tier holds every blob (gantry uploads beside the transfer, distribution stores
#         behind it), so the upstream figures include background fetches;
#   warm  every replica stopped, gantry's local tiers wiped, replicas restarted, the same pulls:
#         served from the object tier.
# Results: $BENCH_OUT/cluster.json and cluster.md (scripts/bench.d/cluster-report.py).
#
# Environment, beside scripts/bench's (BENCH_SCALE, BENCH_LAYERS, BENCH_CLIENTS, BENCH_OUT, ...):
#   BENCH_CLUSTER_PEERS="gantry distribution"   which clusters to measure
#   BENCH_REPLICAS=3                             replicas per cluster
#   GANTRY_GARAGE                                the garage binary (else PATH, else the cache
#                                                scripts/test builds it into)

CLUSTER_PEERS=${BENCH_CLUSTER_PEERS:-gantry distribution}
REPLICAS=${BENCH_REPLICAS:-3}
CRESULTS=$WORK/cluster.tsv
: >"$CRESULTS"
crecord() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$CRESULTS"; }

# Garage's own key format (GK + 24 hex digits, a 64-hex-digit secret); the same as the tests'.
S3_REGION=garage
S3_KEY=GK0123456789abcdef01234567
S3_SECRET=c3ea8cb80333d04e208d136698b1a01ae370d463f0d435ab2177510b3478bf44
CLUSTER_SECRET=gantry-bench-cluster-secret-0123 # 32 characters
declare -A BUCKET_OF=([gantry]=gantry-bench [distribution]=dist-bench)

garage_binary() {
  if [ -n "${GANTRY_GARAGE:-}" ]; then
    [ -x "$GANTRY_GARAGE" ] && echo "$GANTRY_GARAGE"
    return
  fi
  if command -v garage >/dev/null 2>&1; then
    command -v garage
    return
  fi
  local cached=${XDG_CACHE_HOME:-$HOME/.cache}/gantry-test/garage/bin/garage
  [ -x "$cached" ] && echo "$cached"
  return 0
}
GARAGE=$(garage_binary)
[ -n "$GARAGE" ] || die "no garage binary (\$GANTRY_GARAGE, PATH, or ~/.cache/gantry-test/garage/bin/garage: scripts/test builds it)"
command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 ||
  die "the cluster scenario needs redis-server and redis-cli: apt-get install redis-server"

# s3 METHOD BUCKET [QUERY]: one signed request to Garage (curl's SigV4; Garage wants the body's
# hash, here the empty body's); the body on stdout.
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
s3() {
  curl -s --max-time 10 --fail -X "$1" -H "x-amz-content-sha256: $EMPTY_SHA256" \
    --aws-sigv4 "aws:amz:$S3_REGION:s3" -u "$S3_KEY:$S3_SECRET" \
    "http://127.0.0.1:$S3_PORT/$2${3:+?$3}"
}

start_garage() {
  local dir=$WORK/garage
  mkdir -p "$dir"
  S3_PORT=$(free_port)
  local rpc admin
  rpc=$(free_port)
  admin=$(free_port)
  cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"

[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
  GARAGE_CONF=$dir/garage.toml
  # --single-node --default-bucket: layout, key (known credentials) and the first bucket are set up
  # before the S3 API listens.
  start garage "$WORK/logs/garage.log" env GARAGE_DEFAULT_ACCESS_KEY="$S3_KEY" \
    GARAGE_DEFAULT_SECRET_KEY="$S3_SECRET" GARAGE_DEFAULT_BUCKET="${BUCKET_OF[gantry]}" RUST_LOG=garage=warn \
    "$GARAGE" -c "$GARAGE_CONF" server --single-node --default-bucket
  local _
  for _ in $(seq 1 600); do
    s3 GET "${BUCKET_OF[gantry]}" "list-type=2&max-keys=1" >/dev/null 2>&1 && break
    kill -0 "${PIDS[garage]}" 2>/dev/null || die "garage exited; its log: $(tail -20 "$WORK/logs/garage.log")"
    sleep 0.1
  done
  s3 GET "${BUCKET_OF[gantry]}" "list-type=2&max-keys=1" >/dev/null 2>&1 ||
    die "garage did not answer on 127.0.0.1:$S3_PORT in 60 s; its log: $(tail -20 "$WORK/logs/garage.log")"
  local bucket=${BUCKET_OF[distribution]}
  timeout 60 env RUST_LOG=garage=warn "$GARAGE" -c "$GARAGE_CONF" bucket create "$bucket" >>"$WORK/logs/garage-cli.log" 2>&1 ||
    die "garage bucket create $bucket: $(tail -5 "$WORK/logs/garage-cli.log")"
  timeout 60 env RUST_LOG=garage=warn "$GARAGE" -c "$GARAGE_CONF" bucket allow --read --write --owner "$bucket" \
    --key "$S3_KEY" >>"$WORK/logs/garage-cli.log" 2>&1 ||
    die "garage bucket allow $bucket: $(tail -5 "$WORK/logs/garage-cli.log")"
  say "garage on 127.0.0.1:$S3_PORT, buckets ${BUCKET_OF[gantry]} and $bucket"
}

start_redis() {
  REDIS_PORT=$(free_port)
  mkdir -p "$WORK/redis"
  start redis "$WORK/logs/redis.log" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
    --appendonly no --dir "$WORK/redis"
  local _
  for _ in $(seq 1 200); do
    [ "$(timeout 2 redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    kill -0 "${PIDS[redis]}" 2>/dev/null || die "redis-server exited; its log: $(tail -20 "$WORK/logs/redis.log")"
    sleep 0.1
  done
  die "redis-server did not answer on 127.0.0.1:$REDIS_PORT"
}

# The cluster's upstream: its own read-only docker-registry over the pushed storage; its stdout is
# the access log that counts what the cluster asked.
cluster_upstream() { # PEER
  UPORT=$(free_port)
  registry_config "up-$1" "$UPORT" "$SHARED" true >"$WORK/upstream-cluster-$1.yml"
  UPLOG=$WORK/logs/upstream-cluster-$1.access.log
  : >"$UPLOG"
  docker-registry serve "$WORK/upstream-cluster-$1.yml" >"$UPLOG" 2>"$WORK/logs/up-cluster-$1.log" &
  PIDS[up-cluster-$1]=$!
  wait_http "http://127.0.0.1:$UPORT/v2/" "up-cluster-$1"
}

# replica_config PEER I: writes replica I's config (port REPLICA_PORT[I]) into its dir.
declare -A REPLICA_PORT=()
replica_config() {
  local peer=$1 i=$2 dir=$WORK/cl-$1-$2 port=${REPLICA_PORT[$2]}
  mkdir -p "$dir"
  case $peer in
    gantry)
      cat >"$dir/gantry.yaml" <<EOF
listen: 127.0.0.1:$port
admin_listen: null
storage:
  path: $dir/store
  s3:
    endpoint: http://127.0.0.1:$S3_PORT
    bucket: ${BUCKET_OF[gantry]}
    region: $S3_REGION
    access_key_id: $S3_KEY
    secret_access_key: $S3_SECRET
    allow_http: true
cache:
  redis: redis://127.0.0.1:$REDIS_PORT/0
cluster:
  advertise_url: http://127.0.0.1:$port
  secret: $CLUSTER_SECRET
mirroring:
  source: http://127.0.0.1:$UPORT
  insecure: true
  tags_cache_ttl: 10m
registries: []
log:
  level: $GANTRY_LOG
EOF
      timeout 30 "$GANTRY_BIN" check-config "$dir/gantry.yaml" >"$WORK/logs/cl-gantry-check-config.log" 2>&1 ||
        die "gantry rejects the cluster configuration (a build without storage.s3 / cluster?): $(cat "$WORK/logs/cl-gantry-check-config.log")"
      ;;
    distribution)
      # distribution's s3-aws driver (2.8): path-style addressing with an endpoint, SigV4, plain
      # http. `redirect: disable` makes the replicas serve blob bytes themselves (by default they
      # answer 307 to a presigned Garage URL), so both clusters deliver through the same nginx.
      # The shared http.secret is what distribution asks of replicas behind a load balancer.
      cat >"$dir/config.yml" <<EOF
version: 0.1
log:
  level: info
storage:
  s3:
    region: $S3_REGION
    bucket: ${BUCKET_OF[distribution]}
    regionendpoint: http://127.0.0.1:$S3_PORT
    forcepathstyle: true
    accesskey: $S3_KEY
    secretkey: $S3_SECRET
    secure: false
    v4auth: true
  redirect:
    disable: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:$port
  secret: gantry-bench-cluster
proxy:
  remoteurl: http://127.0.0.1:$UPORT
EOF
      ;;
  esac
}

start_replica() { # PEER I
  local peer=$1 i=$2 dir=$WORK/cl-$1-$2
  case $peer in
    gantry) start "cl-gantry-$i" "$WORK/logs/cl-gantry-$i.log" "$GANTRY_BIN" serve --config "$dir/gantry.yaml" ;;
    # The AWS SDK of distribution 2.8 fails to start when AWS_CA_BUNDLE is set (it cannot load a CA
    # bundle into its transport), and the bucket is plain http anyway.
    distribution) start "cl-distribution-$i" "$WORK/logs/cl-distribution-$i.log" \
      env -u AWS_CA_BUNDLE docker-registry serve "$dir/config.yml" ;;
  esac
}

start_replicas() { # PEER
  local i
  for i in $(seq 1 "$REPLICAS"); do start_replica "$1" "$i"; done
  for i in $(seq 1 "$REPLICAS"); do wait_http "http://127.0.0.1:${REPLICA_PORT[$i]}/v2/" "cl-$1-$i"; done
}

stop_replicas() { # PEER
  local i
  for i in $(seq 1 "$REPLICAS"); do
    stop "cl-$1-$i"
    mv "$WORK/logs/cl-$1-$i.log" "$WORK/logs/cl-$1-$i.$(date +%s%N).log"
  done
}

# Plain round-robin: no hashing, no caching, no buffering (a Service or a cloud load balancer).
start_lb() { # PEER
  local peer=$1 dir=$WORK/lb-$1 servers="" i user=""
  mkdir -p "$dir/temp"
  LB_PORT=$(free_port)
  for i in $(seq 1 "$REPLICAS"); do servers+="    server 127.0.0.1:${REPLICA_PORT[$i]};"$'\n'; done
  [ "$(id -u)" = 0 ] && user="user root root;"
  cat >"$dir/nginx.conf" <<EOF
$user
worker_processes auto;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  log_format lb '\$request \$status \$body_bytes_sent \$upstream_addr';
  access_log $dir/access.log lb;
  client_body_temp_path $dir/temp/client;
  proxy_temp_path $dir/temp/proxy;
  fastcgi_temp_path $dir/temp/fastcgi;
  uwsgi_temp_path $dir/temp/uwsgi;
  scgi_temp_path $dir/temp/scgi;
  upstream replicas {
$servers    keepalive 32;
  }
  server {
    listen 127.0.0.1:$LB_PORT;
    location / {
      proxy_pass http://replicas;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$http_host;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }
  }
}
EOF
  start "lb-$peer" "$WORK/logs/lb-$peer.log" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
  wait_http "http://127.0.0.1:$LB_PORT/v2/" "lb-$peer"
}

cluster_ticks() { # PEER: CPU ticks of all its replicas
  local total=0 i
  for i in $(seq 1 "$REPLICAS"); do total=$((total + $(cpu_ticks "${PIDS[cl-$1-$i]}"))); done
  echo "$total"
}
ticks_s() { $PY -c "import sys; print(round((int(sys.argv[2]) - int(sys.argv[1])) / int(sys.argv[3]), 2))" "$1" "$2" "$CLK_TCK"; }

# pulls PEER PHASE: CLIENTS concurrent skopeo pulls through the cluster's nginx; sets WALL.
pulls() {
  local peer=$1 phase=$2 pids=() failed=0 i t0 t1
  t0=$(now)
  for i in $(seq 1 "$CLIENTS"); do
    timeout "$STEP_TIMEOUT" skopeo --insecure-policy copy --quiet --src-tls-verify=false --retry-times=0 \
      "docker://127.0.0.1:$LB_PORT/bench/big:v1" "dir:$PULL/cl-$peer-$phase-$i" \
      >"$WORK/logs/pull-cl-$peer-$phase-$i.log" 2>&1 &
    pids+=($!)
    PIDS[pull-$i]=$!
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || failed=$((failed + 1))
    unset "PIDS[pull-$((i + 1))]"
  done
  t1=$(now)
  rm -rf "$PULL/cl-$peer-$phase"-*
  [ "$failed" = 0 ] || die "$failed of $CLIENTS $phase pulls from the $peer cluster failed: $(tail -5 "$WORK/logs/pull-cl-$peer-$phase-1.log")"
  WALL=$(elapsed "$t0" "$t1")
}

# object_tier PEER: JSON {objects, bytes, missing} of the peer's bucket (missing: image blobs with no
# object of their size whose key names their digest).
object_tier() {
  s3 GET "${BUCKET_OF[$1]}" "list-type=2&max-keys=1000" >"$WORK/bucket-$1.xml" 2>/dev/null || echo '<none/>' >"$WORK/bucket-$1.xml"
  $PY "$HERE/cluster-bucket.py" "$WORK/images.json" v1 <"$WORK/bucket-$1.xml"
}

# wait_object_tier PEER: until every blob of the image is in the peer's bucket (STEP_TIMEOUT at
# most); sets TIER (the last listing) and TIER_WAIT (seconds waited).
wait_object_tier() {
  local t0 deadline
  t0=$(now)
  deadline=$(($(date +%s) + STEP_TIMEOUT))
  while :; do
    TIER=$(object_tier "$1")
    [ "$(json_get "$TIER" missing)" = 0 ] && break
    if [ "$(date +%s)" -ge "$deadline" ]; then
      say "  $1: $(json_get "$TIER" missing) blobs still missing from the object tier after $STEP_TIMEOUT s"
      break
    fi
    sleep 0.2
  done
  TIER_WAIT=$(elapsed "$t0" "$(now)")
}

cluster_peer() { # PEER
  local peer=$1 mark up ticks0 ticks1 i
  say "== cluster: $peer, $REPLICAS replicas behind round-robin nginx, object tier bucket ${BUCKET_OF[$peer]}"
  cluster_upstream "$peer"
  UPLOG_OF[$peer]=$UPLOG
  for i in $(seq 1 "$REPLICAS"); do
    REPLICA_PORT[$i]=$(free_port)
    rm -rf "$WORK/cl-$peer-$i"
    replica_config "$peer" "$i"
  done
  start_replicas "$peer"
  start_lb "$peer"

  sample_quiet
  mark=$(wc -l <"$UPLOG")
  ticks0=$(cluster_ticks "$peer")
  pulls "$peer" cold
  local cold_wall=$WALL
  wait_object_tier "$peer"
  sleep 0.5 # distribution logs a request when it completes
  ticks1=$(cluster_ticks "$peer")
  up=$($PY "$HERE/upstream-log.py" "$UPLOG" "$mark")
  crecord "$peer" cold_wall_s "$cold_wall"
  crecord "$peer" cold_upstream_blob_gets "$(json_get "$up" blob_gets)"
  crecord "$peer" cold_upstream_mib "$(mib "$(json_get "$up" get_bytes)")"
  crecord "$peer" cold_upstream_requests "$(json_get "$up" requests)"
  crecord "$peer" cold_upstream_manifest_requests "$(json_get "$up" manifest_requests)"
  crecord "$peer" cold_cpu_s "$(ticks_s "$ticks0" "$ticks1")"
  crecord "$peer" object_tier_wait_s "$TIER_WAIT"
  crecord "$peer" object_tier_missing "$(json_get "$TIER" missing)"
  crecord "$peer" object_tier_objects "$(json_get "$TIER" objects)"
  crecord "$peer" object_tier_mib "$(mib "$(json_get "$TIER" bytes)")"
  say "  $peer cold: $cold_wall s; object tier complete $TIER_WAIT s later; upstream $up"

  # Warm from the object tier: nothing local survives (gantry's local tiers are wiped; the
  # replicas' memory goes with the processes).
  stop_replicas "$peer"
  if [ "$peer" = gantry ]; then
    for i in $(seq 1 "$REPLICAS"); do rm -rf "$WORK/cl-$peer-$i/store"; done
  fi
  start_replicas "$peer"
  sample_quiet
  mark=$(wc -l <"$UPLOG")
  ticks0=$(cluster_ticks "$peer")
  pulls "$peer" warm
  sleep 0.5
  ticks1=$(cluster_ticks "$peer")
  up=$($PY "$HERE/upstream-log.py" "$UPLOG" "$mark")
  crecord "$peer" warm_wall_s "$WALL"
  crecord "$peer" warm_upstream_blob_gets "$(json_get "$up" blob_gets)"
  crecord "$peer" warm_upstream_mib "$(mib "$(json_get "$up" get_bytes)")"
  crecord "$peer" warm_upstream_requests "$(json_get "$up" requests)"
  crecord "$peer" warm_mibps "$($PY -c "import sys; print(round(int(sys.argv[1]) * int(sys.argv[2]) / float(sys.argv[3]) / 2**20, 1))" "$CLIENTS" "$IMAGE_BYTES" "$WALL")"
  crecord "$peer" warm_cpu_s "$(ticks_s "$ticks0" "$ticks1")"
  if [ "$peer" = gantry ]; then
    local refill=0
    for i in $(seq 1 "$REPLICAS"); do
      refill=$((refill + $(du -sb "$WORK/cl-$peer-$i/store" 2>/dev/null | cut -f1 || echo 0)))
    done
    crecord "$peer" warm_local_refill_mib "$(mib "$refill")"
  fi
  say "  $peer warm: $WALL s; upstream $up"

  stop "lb-$peer"
  stop_replicas "$peer"
  stop "up-cluster-$peer"
}

# ---------------------------------------------------------------------------------------------
say "cluster scenario: work dir $WORK; skopeo copies in $PULL"
SHARED=$WORK/upstream-storage
say "building OCI layout: image $LAYERS"
LAYOUT=$WORK/layout
$PY "$HERE/mkimage.py" "$LAYOUT" "v1=$LAYERS" >"$WORK/images.json"
push_port=$(free_port)
registry_config push "$push_port" "$SHARED" false >"$WORK/push.yml"
start push "$WORK/logs/push.log" docker-registry serve "$WORK/push.yml"
wait_http "http://127.0.0.1:$push_port/v2/" push
timeout "$STEP_TIMEOUT" skopeo --insecure-policy copy --quiet --dest-tls-verify=false \
  "oci:$LAYOUT:v1" "docker://127.0.0.1:$push_port/bench/big:v1" >>"$WORK/logs/push-skopeo.log" 2>&1 ||
  die "push failed: $(tail -5 "$WORK/logs/push-skopeo.log")"
stop push
rm -rf "$LAYOUT"
find "$SHARED" -type f -name data -exec cat {} + >/dev/null
read -r IMAGE_BLOBS IMAGE_BYTES < <($PY -c "
import json, sys
v1 = json.load(open(sys.argv[1]))['v1']
print(1 + len(v1['layers']), v1['config_size'] + sum(l['size'] for l in v1['layers']))" "$WORK/images.json")

json_get() { $PY -c "import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
mib() { $PY -c "import sys; print(round(int(sys.argv[1]) / 2**20, 1))" "$1"; }
declare -A UPLOG_OF=()

start_garage
start_redis
read -r -a CLUSTER_LIST <<<"$CLUSTER_PEERS"
for peer in "${CLUSTER_LIST[@]}"; do
  case $peer in
    gantry | distribution) cluster_peer "$peer" ;;
    *) die "BENCH_CLUSTER_PEERS: unknown peer $peer (gantry, distribution)" ;;
  esac
done

{
  echo -e "meta\tscale\t$SCALE"
  echo -e "meta\tlayers\t$LAYERS"
  echo -e "meta\tclients\t$CLIENTS"
  echo -e "meta\treplicas\t$REPLICAS"
  echo -e "meta\timage_blobs\t$IMAGE_BLOBS"
  echo -e "meta\timage_bytes\t$IMAGE_BYTES"
  echo -e "meta\tgantry_log\t$GANTRY_LOG"
  echo -e "meta\tquiet_samples\t$QUIET_SAMPLES"
  echo -e "meta\tbusy_samples\t$BUSY_SAMPLES"
  echo -e "meta\tmax_load\t$MAX_LOAD"
  if [[ " $CLUSTER_PEERS " == *" gantry "* ]]; then
    echo -e "meta\tgantry_binary\t$GANTRY_BIN, built $(date -u -r "$GANTRY_BIN" +%Y-%m-%dT%H:%M:%SZ)"
  fi
  echo -e "meta\tdate\t$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo -e "meta\tcommit\t$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src 2>/dev/null || echo " (src/ has uncommitted changes)")"
  echo -e "meta\tcpu\t$(nproc) x $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo -e "meta\tversions\tnginx $(nginx -v 2>&1 | sed 's/.*nginx\///'), distribution $(docker-registry --version | awk '{print $3}'), $("$GARAGE" --version 2>/dev/null | head -1), redis $(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/'), skopeo $(skopeo --version | awk '{print $3}')"
} >>"$CRESULTS"
$PY "$HERE/cluster-report.py" "$CRESULTS" "$OUT"
say "results: $OUT/cluster.json, $OUT/cluster.md"
