#!/usr/bin/env bash
# `presence loadgen` straight to Kafka at its ceiling: 500,000 users beating every second
# (500k/s offered) for DURATION seconds on a topic of its own; RUNS runs, then the median of
# the summaries' rates.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${PRESENCE_BIN:-$ROOT/target/release/presence}"
DURATION="${DURATION:-20}"
RUNS="${RUNS:-3}"
rates=()
for i in $(seq 1 "$RUNS"); do
  ID="bench-loadgen-$(date +%s)-$i"
  export PRESENCE_TOPICS__HEARTBEATS="$ID-heartbeats" PRESENCE_TOPICS__FACILITY_STATUS="$ID-facility-status" \
    PRESENCE_TOPICS__DEAD_LETTERS="$ID-heartbeats.dlq" PRESENCE_TOPICS__INTERNAL_PREFIX="$ID.internal." PRESENCE_TELEMETRY__LOG_FILTER=warn
  "$BIN" topics >/dev/null
  line=$("$BIN" loadgen --facilities 25000 --users-per-facility 20 --beat-seconds 1 --mean-session-seconds 100000 \
    --mean-offline-seconds 0.2 --duration-seconds "$DURATION" 2>/dev/null | grep '^loadgen summary')
  echo "run $i: $line"
  rates+=("$(sed -E 's/.*\(([0-9]+)\/s\).*/\1/' <<<"$line")")
done
echo "median: $(printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') heartbeats/s acknowledged by the broker (acks=all, idempotent)"
