#!/usr/bin/env bash
# Gateway throughput from outside the process: wrk against `presence gateway` on a topic of
# its own, single-beat requests and batches of 50, each for DURATION seconds, RUNS times;
# prints every run and the medians. Needs the stack (make stack) and wrk (apt-get install wrk).
#
#   deploy/bench-gateway.sh            DURATION=15 RUNS=3 CONNECTIONS=128
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${PRESENCE_BIN:-$ROOT/target/release/presence}"
DURATION="${DURATION:-15}"
RUNS="${RUNS:-3}"
CONNECTIONS="${CONNECTIONS:-128}"
PORT="${PORT:-18080}"
OPS_PORT="${OPS_PORT:-18104}"
if ! command -v wrk >/dev/null; then
  [[ $(id -u) -eq 0 ]] || { echo "wrk is not installed: sudo apt-get install wrk" >&2; exit 1; }
  echo "installing wrk (apt-get)"; apt-get install -y -qq wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
fi
ID="bench-gateway-$(date +%s)"
export PRESENCE_TOPICS__HEARTBEATS="$ID-heartbeats" PRESENCE_TOPICS__FACILITY_STATUS="$ID-facility-status" \
  PRESENCE_TOPICS__DEAD_LETTERS="$ID-heartbeats.dlq" PRESENCE_TOPICS__INTERNAL_PREFIX="$ID.internal." \
  PRESENCE_GATEWAY__LISTEN="127.0.0.1:$PORT" PRESENCE_GATEWAY__OPS_LISTEN="127.0.0.1:$OPS_PORT" \
  PRESENCE_REDIS__KEY_PREFIX="$ID" PRESENCE_TELEMETRY__LOG_FILTER=warn
# wrk sends as one user: lift the per-identity rate limit (it is still checked per request).
export PRESENCE_GATEWAY__INGEST_PER_MINUTE=60000000 PRESENCE_GATEWAY__INGEST_BURST=1000000
"$BIN" topics >/dev/null
"$BIN" gateway >"/tmp/$ID.log" 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null; wait $GW 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$OPS_PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "http://127.0.0.1:$OPS_PORT/readyz" >/dev/null || { cat "/tmp/$ID.log" >&2; echo "gateway not ready" >&2; exit 1; }

SCRIPT_DIR=$(mktemp -d)
# Each request a different session (so records spread over partitions), as browsers do.
cat >"$SCRIPT_DIR/single.lua" <<'LUA'
local n = 0
request = function()
  n = n + 1
  local body = string.format('{"session_id":"s-%d-%d","user_id":"u","facility_id":"f-%d","region_id":"r","kind":"BEAT"}', id or 0, n, n % 5000)
  return wrk.format("POST", "/v1/heartbeats", {["Content-Type"] = "application/json"}, body)
end
setup = function(thread) thread:set("id", math.random(1, 1e9)) end
LUA
cat >"$SCRIPT_DIR/batch.lua" <<'LUA'
local n = 0
request = function()
  local beats = {}
  for i = 1, 50 do
    n = n + 1
    beats[i] = string.format('{"session_id":"s-%d","user_id":"u","facility_id":"f-%d","region_id":"r"}', n, n % 5000)
  end
  return wrk.format("POST", "/v1/heartbeats", {["Content-Type"] = "application/json"}, "[" .. table.concat(beats, ",") .. "]")
end
LUA
cat >"$SCRIPT_DIR/report.lua" <<'LUA'
done = function(summary, latency, requests)
  local non2xx = (summary.errors.status or 0)
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d\n", summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, non2xx, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA
run() { # name script
  local rates=() p50s=() p99s=()
  for i in $(seq 1 "$RUNS"); do
    local line
    line=$(cd "$SCRIPT_DIR" && cat "$2" report.lua >combined.lua && wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s combined.lua "http://127.0.0.1:$PORT" | grep '^RESULT')
    read -r _ rate p50 p99 non2xx errors <<<"$line"
    echo "$1 run $i: $rate requests/s, p50 $p50 ms, p99 $p99 ms, non-202 $non2xx, socket errors $errors"
    rates+=("$rate"); p50s+=("$p50"); p99s+=("$p99")
  done
  med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  echo "$1 median: $(med "${rates[@]}") requests/s, p50 $(med "${p50s[@]}") ms, p99 $(med "${p99s[@]}") ms"
}
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s against presence gateway (acks=all, 202 after the broker's ack), topic $PRESENCE_TOPICS__HEARTBEATS"
run single single.lua
run "batch(50)" batch.lua
echo "accepted heartbeats: $(curl -s "http://127.0.0.1:$OPS_PORT/metrics" | awk '/^presence_gateway_heartbeats_accepted_total/ {print $2}')"
