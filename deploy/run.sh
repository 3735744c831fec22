#!/usr/bin/env bash
# Starts and stops the pipeline's processes in the background for `make up` / `make down`,
# each with its log in .run/<name>.log, and waits until each one's /readyz answers 200.
#
#   deploy/run.sh start | stop | status
#
# PRESENCE_PROCESSES overrides which processes run (default: every one built so far).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$ROOT/.run"
BIN="${PRESENCE_BIN:-$ROOT/target/release/presence}"
# name:ops-port ("-": no ops endpoint to wait for). The gateway's ops port (9104) is apart
# from its public one (8080). The demo load is gentle: 50 facilities of 4 users, a beat
# every 30 s each, sent through the gateway like browsers.
DEFAULT_PROCESSES="processor:9101 notifier:9102 sink:9103 gateway:9104 loadgen:-"
LOADGEN_ARGS="${PRESENCE_LOADGEN_ARGS:---target http://127.0.0.1:8080}"
PROCESSES="${PRESENCE_PROCESSES:-$DEFAULT_PROCESSES}"

say() { printf '[run] %s\n' "$*"; }

start() {
  mkdir -p "$RUN"
  for entry in $PROCESSES; do
    local name="${entry%%:*}" port="${entry#*:}"
    local pidfile="$RUN/$name.pid"
    if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      say "$name: already running (pid $(cat "$pidfile"))"; continue
    fi
    if [[ "$port" == "-" ]]; then say "$name: starting (log $RUN/$name.log)"; else say "$name: starting (log $RUN/$name.log, metrics http://127.0.0.1:$port/metrics)"; fi
    local args=()
    [[ "$name" == "loadgen" ]] && read -r -a args <<<"$LOADGEN_ARGS"
    setsid nohup "$BIN" "$name" "${args[@]}" >>"$RUN/$name.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
  done
  for entry in $PROCESSES; do
    local name="${entry%%:*}" port="${entry#*:}" deadline=$((SECONDS + 60))
    [[ "$port" == "-" ]] && { kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null && say "$name: running" || { tail -n 20 "$RUN/$name.log" >&2; say "$name exited; read $RUN/$name.log"; exit 1; }; continue; }
    until curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; do
      if ! kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
        tail -n 20 "$RUN/$name.log" >&2; say "$name exited; read $RUN/$name.log"; exit 1
      fi
      if ((SECONDS >= deadline)); then
        curl -s "http://127.0.0.1:$port/readyz" >&2 || true
        say "$name not ready after 60 s; read $RUN/$name.log"; exit 1
      fi
      sleep 0.5
    done
    say "$name: ready"
  done
}

stop() {
  # The load first, the gateway before what feeds it: reverse start order.
  local reversed=""
  for entry in $PROCESSES; do reversed="$entry $reversed"; done
  for entry in $reversed; do
    local name="${entry%%:*}" pidfile="$RUN/${entry%%:*}.pid"
    [[ -f "$pidfile" ]] || continue
    local pid; pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      say "$name: stopping (SIGTERM)"
      kill -TERM "$pid"
      local deadline=$((SECONDS + 30))
      while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
      kill -0 "$pid" 2>/dev/null && { say "$name: did not stop in 30 s, killing"; kill -KILL "$pid"; }
    fi
    rm -f "$pidfile"
  done
}

status() {
  for entry in $PROCESSES; do
    local name="${entry%%:*}" port="${entry#*:}"
    if [[ "$port" == "-" ]]; then
      if [[ -f "$RUN/$name.pid" ]] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then say "$name  running"; else say "$name  not running"; fi
      continue
    fi
    if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then say "$name  ready  http://127.0.0.1:$port/metrics"; else say "$name  not ready"; fi
  done
}

case "${1:-status}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: deploy/run.sh start|stop|status" >&2; exit 2 ;;
esac
