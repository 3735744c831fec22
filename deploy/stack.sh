#!/usr/bin/env bash
# The local stack without Docker: Apache Kafka 4.x (one KRaft node, broker and controller in
# one JVM, jars from Maven Central), Redis and PostgreSQL from Debian's packages, all bound to
# 127.0.0.1. Idempotent: a service that already answers is reused, a second `up` changes
# nothing.
#
#   deploy/stack.sh up       install what is missing, start what is not running, wait
#   deploy/stack.sh down     stop what this script started
#   deploy/stack.sh status   say what answers and where the logs are
#   deploy/stack.sh deps     only install build and runtime packages (apt-get, mvn, pip, npm)
#   deploy/stack.sh kafka-up | kafka-down | redis-up | redis-down | pg-up | pg-down
#                            one service alone; with the settings below pointing at a
#                            directory and ports of its own, this is how tests run a private
#                            instance that they can stop and restart
#   deploy/stack.sh sweep    removes the topics, consumer groups, schemas and keys that finished
#                            test processes left (their names carry the process id)
#   deploy/stack.sh registry-up | registry-down | registry-url
#                            Apicurio Registry 2.4.2.Final (its /apis/ccompat/v7 is the
#                            Confluent Schema Registry API), built once from Maven Central as a
#                            Quarkus fast-jar (deploy/registry/pom.xml) into the cache, run on
#                            127.0.0.1:$REGISTRY_PORT with in-memory storage; `up` starts it too
#   deploy/stack.sh prometheus-up | prometheus-down
#                            a real Prometheus scraping every process (make monitor; below)
#   deploy/stack.sh prometheus-rules-test
#                            promtool check + unit tests of deploy/prometheus/rules
#   deploy/stack.sh helm     builds helm (go install, cached) and prints its path
#   deploy/stack.sh tls-certs DIR
#                            a throw-away CA and certificates for TLS tests (openssl): ca.crt,
#                            server.crt/.key (for 127.0.0.1 and localhost), client.crt/.key,
#                            other-ca.crt (a CA that signed nothing here)
#
# Settings (environment): PRESENCE_STACK_DIR (state and logs, default ~/.cache/presence/stack),
# KAFKA_VERSION (default 4.1.0), KAFKA_PORT (9092), KAFKA_CONTROLLER_PORT (9093), KAFKA_FRESH
# (1: a single node that is not running starts from an empty data directory; CI sets it),
# KAFKA_START_SECONDS (how long a starting node may take to listen, default 600),
# REDIS_PORT (6379), PG_PORT (5432), REGISTRY_PORT (8081), PG_DATA (default /var/lib/presence/postgres: the
# postgres user must be able to reach it, which rules out root's home).
#
# TLS (private instances for tests; absolute paths to PEM files):
#   REDIS_TLS_CERT, REDIS_TLS_KEY, REDIS_TLS_CA: Redis speaks TLS only, on REDIS_PORT;
#     REDIS_TLS_AUTH_CLIENTS = no | optional (default) | yes (client certificate required,
#     signed by REDIS_TLS_CA). redis-cli here presents the server's pair as its client
#     certificate, so that pair must not be limited to serverAuth.
#   PG_TLS_CERT, PG_TLS_KEY: PostgreSQL with ssl = on, and TCP logins over TLS only
#     (hostssl); PG_TLS_CA as well: a client certificate signed by it is required too.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PRESENCE_CACHE_DIR:-$HOME/.cache/presence}"
STACK_DIR="${PRESENCE_STACK_DIR:-$CACHE/stack}"
KAFKA_VERSION="${KAFKA_VERSION:-4.1.0}"
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
CLUSTER_PORT="${CLUSTER_PORT:-19092}"
REDIS_PORT="${REDIS_PORT:-6379}"
PG_PORT="${PG_PORT:-5432}"
REGISTRY_VERSION=2.4.2.Final
REGISTRY_HOME="$CACHE/apicurio-registry-$REGISTRY_VERSION"
REGISTRY_PORT="${REGISTRY_PORT:-8081}"
PG_DATA="${PG_DATA:-/var/lib/presence/postgres}"
# The write path of a sink under a backlog: with PostgreSQL's defaults (max_wal_size 1GB,
# shared_buffers 128MB) `presence bench sink` filled the WAL allowance every 16-26 s, and
# each of those checkpoints made every page's next change write a full page image into the
# WAL (the server log said "checkpoints are occurring too frequently ... Consider increasing
# max_wal_size"). 4GB of WAL between checkpoints and 512MB of buffers (the history's hot
# index pages and the current status stay cached) are modest for a database server; change
# them here, or configure your own server.
PG_SETTINGS="${PG_SETTINGS:--c max_wal_size=4GB -c shared_buffers=512MB}"
PG_USER=presence
PG_PASSWORD=presence
PG_DB=presence
VENV="$CACHE/venv"

say() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_for <seconds> <what> <log> <command...>: polls a readiness check with a deadline and
# names the log to read when the service does not come up.
wait_for() {
  local secs="$1" what="$2" log="$3"; shift 3
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      [[ -f "$log" ]] && tail -n 30 "$log" >&2
      die "$what did not become ready within ${secs}s; read $log"
    fi
    sleep 0.5
  done
}

as_root() {
  if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root to run '$*': run this script as root or install the packages yourself"
  fi
}

APT_UPDATED=0
apt_install() {
  local missing=()
  # "install ok installed" only: a removed package keeps a dpkg entry (config files).
  for pkg in "$@"; do
    [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] || missing+=("$pkg")
  done
  ((${#missing[@]} == 0)) && return 0
  say "installing ${missing[*]} (apt-get)"
  if ((APT_UPDATED == 0)); then as_root apt-get update -qq; APT_UPDATED=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pg_bin() {
  local d
  d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$d" ]] || die "PostgreSQL binaries not found under /usr/lib/postgresql"
  echo "$d"
}

deps() {
  # Build: librdkafka is compiled from source by rdkafka-sys (cmake), with OpenSSL for TLS/SASL.
  apt_install cmake pkg-config libssl-dev zlib1g-dev libcurl4-openssl-dev build-essential curl \
    redis-server redis-tools postgresql postgresql-client
  kafka_jars
  python_env
  browser_env
}

browser_env() {
  # Headless Chromium and Playwright's driver library for the browser tests.
  apt_install chromium
  if [[ -f "$CACHE/node/node_modules/playwright-core/package.json" ]]; then return 0; fi
  command -v npm >/dev/null || apt_install nodejs npm
  say "installing playwright-core into $CACHE/node (npm)"
  mkdir -p "$CACHE/node"
  (cd "$CACHE/node" && npm install --silent --no-audit --no-fund --prefix . playwright-core@1 >/dev/null) \
    || die "npm could not install playwright-core; check network access to the npm registry"
}

# Kafka's jars, resolved once per version of deploy/kafka/pom.xml: the marker holds the pom's
# checksum, so a changed pom (a pinned dependency) re-resolves into a clean directory.
kafka_jars() {
  local pom="$ROOT/deploy/kafka/pom.xml" sum
  sum=$(sha256sum "$pom" | cut -d' ' -f1)
  if [[ -f "$KAFKA_LIBS/.complete" ]] && [[ "$(cat "$KAFKA_LIBS/.complete")" == "$sum" ]]; then return 0; fi
  command -v mvn >/dev/null || apt_install maven
  say "resolving Apache Kafka $KAFKA_VERSION from Maven Central into $KAFKA_LIBS"
  rm -rf "$KAFKA_LIBS"
  mkdir -p "$KAFKA_LIBS"
  mvn -q -B -f "$pom" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$KAFKA_LIBS" \
    || die "mvn could not resolve Kafka $KAFKA_VERSION; check network access to Maven Central"
  echo "$sum" >"$KAFKA_LIBS/.complete"
}

python_env() {
  # Python's Avro library for the cross-implementation codec test, Confluent's client for the
  # registry test and the Python example, kubernetes-validate, jsonschema and PyYAML for the
  # chart and compose checks (deploy/check-packaging.sh), openapi-spec-validator for the
  # gateway's OpenAPI document. Reinstalled whenever the requirements change.
  local req="$ROOT/deploy/python-requirements.txt"
  if [[ -x "$VENV/bin/python" ]] && cmp -s "$req" "$VENV/.requirements"; then return 0; fi
  say "installing deploy/python-requirements.txt into $VENV (pip)"
  [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV" || { apt_install python3-venv; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q -r "$req" || die "pip could not install $req; check network access to PyPI"
  cp "$req" "$VENV/.requirements"
}

# Apicurio Registry: built once (about two minutes cold, Maven Central only), then reused.
registry_app() {
  if [[ -f "$REGISTRY_HOME/.complete" ]]; then return 0; fi
  command -v mvn >/dev/null || apt_install maven
  mkdir -p "$REGISTRY_HOME"
  say "building Apicurio Registry $REGISTRY_VERSION from Maven Central into $REGISTRY_HOME (log $REGISTRY_HOME/build.log)"
  rm -rf "$REGISTRY_HOME/build"
  mvn -B -s "$ROOT/deploy/registry/settings.xml" -f "$ROOT/deploy/registry/pom.xml" package \
    -D%prod.quarkus.package.type=fast-jar -Dregistry.build.dir="$REGISTRY_HOME/build" \
    >"$REGISTRY_HOME/build.log" 2>&1 \
    || { grep -E 'ERROR|BUILD' "$REGISTRY_HOME/build.log" | head -n 20 >&2; die "building Apicurio Registry failed; read $REGISTRY_HOME/build.log (network access to Maven Central?)"; }
  touch "$REGISTRY_HOME/.complete"
}

registry_url() { echo "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7"; }
registry_ready() { curl -sf -o /dev/null --max-time 2 "$(registry_url)/subjects"; }

registry_up() {
  if registry_ready; then say "registry: reusing what answers at $(registry_url)"; return 0; fi
  port_open "$REGISTRY_PORT" && die "127.0.0.1:$REGISTRY_PORT is taken by something that is not a schema registry; stop it or set REGISTRY_PORT"
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  registry_app
  local dir="$STACK_DIR/registry"
  mkdir -p "$dir"
  say "registry: starting Apicurio Registry $REGISTRY_VERSION on 127.0.0.1:$REGISTRY_PORT, in-memory storage (log $dir/registry.log)"
  # In-memory storage: subjects live as long as the process; `presence topics` registers
  # them again after a restart.
  setsid nohup java -Xms64m -Xmx384m -XX:+UseSerialGC -Djava.awt.headless=true \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.log.level=WARN \
    -jar "$REGISTRY_HOME/build/quarkus-app/quarkus-run.jar" >"$dir/registry.log" 2>&1 </dev/null &
  echo $! >"$dir/registry.pid"
  wait_for 180 "registry at $(registry_url)" "$dir/registry.log" registry_ready
}

registry_down() {
  local pidfile="$STACK_DIR/registry/registry.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    say "registry: stopping"
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$pidfile"
}

kafka_ready() {
  local port="${1:-$KAFKA_PORT}"
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$STACK_DIR/kafka-tools-log4j2.properties" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$port" --list
}

# kafka_node_config <dir> <node id> <port> <controller port> <quorum voters> <replication> <min isr>
# writes one KRaft node's server.properties (broker and controller in one JVM) and logging.
kafka_node_config() {
  local dir="$1" id="$2" port="$3" cport="$4" voters="$5" rf="$6" isr="$7"
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<EOF
# Written by deploy/stack.sh: broker and controller in one JVM (KRaft), node $id.
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
# Transactions and consumer groups: replication $rf, min ISR $isr (a single node needs 1 and 1).
offsets.topic.replication.factor=$rf
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
transaction.state.log.num.partitions=8
# A processor instance that dies holds read_committed readers (the next stage, the instance
# that takes its partitions over) at its open transaction until the coordinator aborts it:
# transaction.timeout.ms after it began (10 s), found by a scan every this often (default
# 10 s, which added up to 10 s more to a takeover). Production brokers want it too.
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
min.insync.replicas=$isr
default.replication.factor=$rf
share.coordinator.state.topic.replication.factor=$rf
share.coordinator.state.topic.min.isr=$isr
group.initial.rebalance.delay.ms=0
# Topics are created by 'presence topics' only, so a typo never makes a topic.
auto.create.topics.enable=false
num.partitions=1
# Compaction that really happens on a small local topic.
log.cleaner.backoff.ms=1000
EOF
  cat >"$dir/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.controller.name = org.apache.kafka.controller
logger.controller.level = warn
EOF
}

# Quiet logging for the command-line tools (storage format, topic listing).
tools_log_config() {
  mkdir -p "$STACK_DIR"
  [[ -f "$STACK_DIR/kafka-tools-log4j2.properties" ]] \
    || printf 'status = error\nrootLogger.level = error\n' >"$STACK_DIR/kafka-tools-log4j2.properties"
}

new_cluster_id() {
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$STACK_DIR/kafka-tools-log4j2.properties" \
    kafka.tools.StorageTool random-uuid 2>/dev/null
}

# kafka_node_format <dir> <cluster id>: formats the node's storage once.
kafka_node_format() {
  local dir="$1" cluster_id="$2"
  [[ -f "$dir/data/meta.properties" ]] && return 0
  say "kafka: formatting $dir/data (cluster $cluster_id)"
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$STACK_DIR/kafka-tools-log4j2.properties" \
    kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" >"$dir/format.log" 2>&1 \
    || { cat "$dir/format.log" >&2; die "kafka storage format failed; see $dir/format.log"; }
}

# The JVM options Kafka's own start script (kafka-run-class.sh) gives a broker. Without
# MaxGCPauseMillis=20, G1 aims at 200 ms pauses: on this stack it let the young generation
# grow until each collection stopped the broker for 30-60 ms every 3 s under the latency
# bench's load, which every request in flight waited out (docs/benchmarks.md, "Latency").
KAFKA_JVM_OPTS=(-server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35
  -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true)

# kafka_node_start <dir> <port> <max heap>: starts a configured, formatted node in the background.
kafka_node_start() {
  local dir="$1" port="$2" heap="$3"
  say "kafka: starting Apache Kafka $KAFKA_VERSION on 127.0.0.1:$port (log $dir/server.log)"
  setsid nohup java -Xms256m "-Xmx$heap" "${KAFKA_JVM_OPTS[@]}" \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 </dev/null &
  echo $! >"$dir/kafka.pid"
}

# kafka_node_pid <dir>: the pid in the node's pid file if that process is this node's JVM (its
# command line names the node's directory). A pid file left from an earlier boot can name a
# process that is something else now: that is never waited for or signalled.
kafka_node_pid() {
  local dir="$1" pid
  [[ -f "$dir/kafka.pid" ]] || return 1
  pid=$(cat "$dir/kafka.pid")
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$dir/log4j2.properties" || return 1
  echo "$pid"
}

# kafka_node_wait <dir> <port>: waits for a started node to listen. A node loading many
# partitions (a data directory full of earlier runs' topics) takes minutes, so the deadline is
# long (KAFKA_START_SECONDS, default 600) but the wait ends at once, with the JVM's own output,
# if the process dies; progress is reported every 30 s.
kafka_node_wait() {
  local dir="$1" port="$2" pid secs="${KAFKA_START_SECONDS:-600}"
  pid=$(cat "$dir/kafka.pid")
  local start=$SECONDS next=$((SECONDS + 30))
  until port_open "$port"; do
    if ! kafka_node_pid "$dir" >/dev/null; then
      tail -n 30 "$dir/stdout.log" "$dir/server.log" >&2 2>/dev/null || true
      die "kafka (pid $pid) exited before listening on 127.0.0.1:$port; read $dir/stdout.log and $dir/server.log"
    fi
    if ((SECONDS - start >= secs)); then
      tail -n 30 "$dir/server.log" >&2 2>/dev/null || true
      die "kafka on 127.0.0.1:$port did not listen within ${secs}s (still running as pid $pid); read $dir/server.log"
    fi
    if ((SECONDS >= next)); then
      say "kafka: still starting after $((SECONDS - start)) s ($(find "$dir/data" -mindepth 1 -maxdepth 1 -type d | wc -l) partition directories to load; log $dir/server.log)"
      next=$((SECONDS + 30))
    fi
    sleep 0.5
  done
}

# kafka_node_stop <dir> [TERM|KILL]: a clean stop (waits up to 60 s, then kill -9) or kill -9.
kafka_node_stop() {
  local dir="$1" sig="${2:-TERM}"
  [[ -f "$dir/kafka.pid" ]] || return 0
  local pid
  if pid=$(kafka_node_pid "$dir"); then
    say "kafka: stopping $dir ($sig)"
    kill "-$sig" "$pid"
    local deadline=$((SECONDS + 60))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
  fi
  rm -f "$dir/kafka.pid"
}

kafka_up() {
  if port_open "$KAFKA_PORT"; then say "kafka: reusing what answers on 127.0.0.1:$KAFKA_PORT"; return 0; fi
  kafka_jars
  tools_log_config
  local dir="$STACK_DIR/kafka"
  if kafka_node_pid "$dir" >/dev/null; then
    # Started earlier (by another `up`) and still loading: wait for it, never start a second
    # JVM on the same data directory and ports.
    say "kafka: pid $(cat "$dir/kafka.pid") is starting already; waiting for it"
  else
    if [[ "${KAFKA_FRESH:-0}" == 1 && -d "$dir/data" ]]; then
      say "kafka: KAFKA_FRESH=1: starting from an empty data directory ($dir/data)"
      rm -rf "$dir/data"
    fi
    kafka_node_config "$dir" 1 "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT" "1@127.0.0.1:$KAFKA_CONTROLLER_PORT" 1 1
    kafka_node_format "$dir" "$(new_cluster_id)"
    kafka_node_start "$dir" "$KAFKA_PORT" 1g
  fi
  kafka_node_wait "$dir" "$KAFKA_PORT"
  wait_for 120 "kafka metadata" "$dir/server.log" kafka_ready "$KAFKA_PORT"
}

# The three-node cluster (make cluster): node i (1..3) serves clients on CLUSTER_PORT + 2(i-1)
# and its controller on the port after it, data in $STACK_DIR/cluster/node-i; a controller
# quorum of three, replication 3 and min ISR 2 for every topic, the offsets topic and the
# transaction state log, as in production.
cluster_dir() { echo "$STACK_DIR/cluster/node-$1"; }
cluster_port() { echo $((CLUSTER_PORT + 2 * ($1 - 1))); }
cluster_cport() { echo $((CLUSTER_PORT + 2 * ($1 - 1) + 1)); }
cluster_brokers() { echo "127.0.0.1:$(cluster_port 1),127.0.0.1:$(cluster_port 2),127.0.0.1:$(cluster_port 3)"; }
cluster_voters() { echo "1@127.0.0.1:$(cluster_cport 1),2@127.0.0.1:$(cluster_cport 2),3@127.0.0.1:$(cluster_cport 3)"; }

cluster_configure() {
  kafka_jars
  tools_log_config
  local i voters; voters=$(cluster_voters)
  for i in 1 2 3; do
    kafka_node_config "$(cluster_dir "$i")" "$i" "$(cluster_port "$i")" "$(cluster_cport "$i")" "$voters" 3 2
  done
  if [[ ! -f "$(cluster_dir 1)/data/meta.properties" ]]; then
    local id; id=$(new_cluster_id)
    for i in 1 2 3; do kafka_node_format "$(cluster_dir "$i")" "$id"; done
  fi
}

# cluster_node_up <i>: starts node i unless it answers already (does not wait).
cluster_node_up() {
  local i="$1"
  if port_open "$(cluster_port "$i")"; then
    say "kafka node $i: reusing what answers on 127.0.0.1:$(cluster_port "$i")"; return 0
  fi
  cluster_configure
  kafka_node_start "$(cluster_dir "$i")" "$(cluster_port "$i")" 768m
}

cluster_up() {
  local i
  for i in 1 2 3; do cluster_node_up "$i"; done
  for i in 1 2 3; do
    kafka_node_wait "$(cluster_dir "$i")" "$(cluster_port "$i")"
  done
  wait_for 120 "kafka cluster metadata" "$(cluster_dir 1)/server.log" kafka_ready "$(cluster_port 1)"
  say "cluster   up    KAFKA_BROKERS=$(cluster_brokers)   logs $STACK_DIR/cluster/node-*/server.log"
}

cluster_down() { local i; for i in 1 2 3; do kafka_node_stop "$(cluster_dir "$i")"; done; }

cluster_status() {
  local i ok=0
  for i in 1 2 3; do
    if port_open "$(cluster_port "$i")"; then
      say "kafka node $i  up    127.0.0.1:$(cluster_port "$i")   log $(cluster_dir "$i")/server.log"
    else say "kafka node $i  DOWN"; ok=1; fi
  done
  say "KAFKA_BROKERS=$(cluster_brokers)"
  return $ok
}

redis_tls() { [[ -n "${REDIS_TLS_CERT:-}${REDIS_TLS_KEY:-}${REDIS_TLS_CA:-}" ]]; }

# redis-cli against REDIS_PORT, over TLS when the instance speaks it.
redis_cli() {
  if redis_tls; then
    redis-cli --tls --cacert "$REDIS_TLS_CA" --cert "$REDIS_TLS_CERT" --key "$REDIS_TLS_KEY" \
      -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  else
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  fi
}

redis_ping() { redis_cli ping 2>/dev/null | grep -q PONG; }

redis_up() {
  if redis_ping; then
    say "redis: reusing what answers on 127.0.0.1:$REDIS_PORT"; return 0
  fi
  command -v redis-server >/dev/null || apt_install redis-server redis-tools
  local dir="$STACK_DIR/redis"
  mkdir -p "$dir"
  local listen=(--port "$REDIS_PORT") what="redis"
  if redis_tls; then
    for f in REDIS_TLS_CERT REDIS_TLS_KEY REDIS_TLS_CA; do
      [[ "${!f:-}" == /* && -f "${!f}" ]] || die "$f must be the absolute path of a PEM file (TLS needs REDIS_TLS_CERT, REDIS_TLS_KEY and REDIS_TLS_CA)"
    done
    # --port 0: no plaintext listener at all.
    listen=(--port 0 --tls-port "$REDIS_PORT" --tls-cert-file "$REDIS_TLS_CERT" --tls-key-file "$REDIS_TLS_KEY"
      --tls-ca-cert-file "$REDIS_TLS_CA" --tls-auth-clients "${REDIS_TLS_AUTH_CLIENTS:-optional}")
    what="redis (TLS only)"
  fi
  say "$what: starting on 127.0.0.1:$REDIS_PORT (log $dir/redis.log)"
  # Append-only file: the status cache and replay logs survive a restart of Redis.
  redis-server --bind 127.0.0.1 "${listen[@]}" --daemonize yes --dir "$dir" \
    --logfile "$dir/redis.log" --pidfile "$dir/redis.pid" --save "" --appendonly yes --appendfsync everysec
  wait_for 30 "$what on 127.0.0.1:$REDIS_PORT" "$dir/redis.log" redis_ping
}

pg_url() { echo "postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"; }

# With PG_TLS_CERT/PG_TLS_KEY: the pair copied into the data directory (the server wants its
# key owned by it, mode 0600), TCP logins over TLS only, and with PG_TLS_CA a client
# certificate signed by it on top of the password. Prints the server options to add.
pg_tls() {
  [[ -n "${PG_TLS_CERT:-}${PG_TLS_KEY:-}" ]] || return 0
  for f in PG_TLS_CERT PG_TLS_KEY; do
    [[ -f "${!f:-}" ]] || die "$f must name a PEM file (TLS needs PG_TLS_CERT and PG_TLS_KEY)"
  done
  as_root install -o postgres -g postgres -m 600 "$PG_TLS_CERT" "$PG_DATA/tls-server.crt"
  as_root install -o postgres -g postgres -m 600 "$PG_TLS_KEY" "$PG_DATA/tls-server.key"
  local client=""
  if [[ -n "${PG_TLS_CA:-}" ]]; then
    as_root install -o postgres -g postgres -m 600 "$PG_TLS_CA" "$PG_DATA/tls-ca.crt"
    client=" clientcert=verify-ca"
  fi
  as_root sed -i -E "s/^host(ssl)?([[:space:]].*scram-sha-256).*\$/hostssl\2$client/" "$PG_DATA/pg_hba.conf"
  printf ' -c ssl=on -c ssl_cert_file=tls-server.crt -c ssl_key_file=tls-server.key'
  [[ -n "${PG_TLS_CA:-}" ]] && printf ' -c ssl_ca_file=tls-ca.crt'
  return 0
}

pg_up() {
  [[ -d /usr/lib/postgresql ]] || apt_install postgresql postgresql-client
  local bin; bin=$(pg_bin)
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    say "postgres: reusing what answers on 127.0.0.1:$PG_PORT"
  else
    if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
      say "postgres: initialising $PG_DATA"
      as_root mkdir -p "$PG_DATA"
      as_root chown postgres:postgres "$PG_DATA"
      as_root chmod 700 "$PG_DATA"
      as_root runuser -u postgres -- "$bin/initdb" -D "$PG_DATA" -U postgres \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    fi
    local tls; tls=$(pg_tls)
    say "postgres: starting on 127.0.0.1:$PG_PORT${tls:+ (TLS only)} (log $PG_DATA/server.log)"
    as_root runuser -u postgres -- "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DATA -c max_connections=200 $PG_SETTINGS$tls" start >/dev/null \
      || die "postgres did not start; read $PG_DATA/server.log"
  fi
  if ! psql "$(pg_url)" -qAtc 'select 1' >/dev/null 2>&1; then
    [[ -S "$PG_DATA/.s.PGSQL.$PG_PORT" ]] || die "postgres on $PG_PORT does not accept $(pg_url | sed 's/:[^:@]*@/:***@/') and was not started by this script; create role '$PG_USER' and database '$PG_DB' there, or set PG_PORT to a free port"
    say "postgres: creating role $PG_USER and database $PG_DB"
    as_root runuser -u postgres -- psql -h "$PG_DATA" -p "$PG_PORT" -qAt -v ON_ERROR_STOP=1 <<EOF >/dev/null
DO \$\$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') THEN
    CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD';
  END IF;
END \$\$;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB')\gexec
EOF
  fi
}

# tls_certs DIR: a CA, a server pair for 127.0.0.1 and localhost, a client pair, and a second
# CA that signed none of them (for "wrong CA" tests). P-256 keys, valid two days, no
# extendedKeyUsage (the server pair doubles as redis-cli's client certificate).
tls_certs() {
  local dir="$1" ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  mkdir -p "$dir"
  (
    cd "$dir"
    openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 2 -subj "/CN=presence test CA"
    openssl req -x509 "${ec[@]}" -keyout other-ca.key -out other-ca.crt -days 2 -subj "/CN=presence other CA"
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n' >server.ext
    printf 'basicConstraints=CA:FALSE\n' >client.ext
    for who in server client; do
      openssl req "${ec[@]}" -keyout "$who.key" -out "$who.csr" -subj "/CN=presence test $who"
      openssl x509 -req -in "$who.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile "$who.ext" -out "$who.crt"
    done
    chmod 600 ./*.key
  ) >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; die "openssl could not make test certificates in $dir"; }
}

# sweep: removes from the shared stack what test processes that no longer run left behind.
# Test names carry their process id (testkit::unique: t-<pid>-<nanos>-<n>), so a name whose
# process is gone is garbage whether the test cleaned up or was killed: its topics and
# consumer groups in Kafka, its schema in PostgreSQL (t_<pid>_...), its keys in Redis, its
# processors' state directories under <tmp>/presence-state.
# `make test` sweeps before and after the tests; a running test's names are never touched.
dead_test_pids() {
  { grep -oE "^t[-_][0-9]+[-_]" || true; } | tr -d -- '-_t' | sort -u | while read -r pid; do
    kill -0 "$pid" 2>/dev/null || echo "$pid"
  done
}

kafka_tool() {
  java -cp "$KAFKA_LIBS/*" -Dlog4j2.configurationFile="$STACK_DIR/kafka-tools-log4j2.properties" "$@"
}

# sweep_orphans: stops the private services (brokers, clusters, Redis, PostgreSQL; their
# directories are named <kind>-<test pid>-<nanos>-<n>) of test processes that no longer run. A
# test binary killed by make test's time budget (or by hand) never runs the drop that stops
# what it started with setsid, and three idle brokers would slow every test after it.
sweep_orphans() {
  local pid args owner victims=() left i
  while read -r pid args; do
    owner=$({ grep -oE "/(cluster|kafka|redis|pg)-[0-9]+-[0-9]{6,}-[0-9]+" <<<"$args" || true; } | head -n 1 | cut -d- -f2)
    [[ -n "$owner" ]] || continue
    kill -0 "$owner" 2>/dev/null && continue
    victims+=("$pid")
  done < <(ps -eo pid=,args=)
  ((${#victims[@]})) || return 0
  say "sweep: stopping ${#victims[@]} private services of finished test processes (pids ${victims[*]})"
  kill -TERM "${victims[@]}" 2>/dev/null || true
  for i in $(seq 1 40); do
    left=()
    for pid in "${victims[@]}"; do kill -0 "$pid" 2>/dev/null && left+=("$pid"); done
    ((${#left[@]})) || return 0
    sleep 0.5
  done
  kill -KILL "${left[@]}" 2>/dev/null || true
}

sweep() {
  sweep_orphans
  tools_log_config
  local boot="127.0.0.1:$KAFKA_PORT" names pids alt
  if port_open "$KAFKA_PORT"; then
    names=$(kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$boot" --list)
    pids=$(dead_test_pids <<<"$names" | paste -sd'|' -)
    if [[ -n "$pids" ]]; then
      say "sweep: deleting $(grep -cE "^t-($pids)-" <<<"$names") topics of $(tr '|' '\n' <<<"$pids" | wc -l) finished test processes"
      kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$boot" --delete \
        --topic "t-($pids)-[0-9]+-[0-9]+[-.].*" >/dev/null \
        || say "sweep: some topics could not be deleted (a later sweep retries)"
    fi
    names=$(kafka_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$boot" --list 2>/dev/null || true)
    pids=$(dead_test_pids <<<"$names" | paste -sd'|' -)
    if [[ -n "$pids" ]]; then
      local groups; groups=$(grep -E "^t-($pids)-" <<<"$names" || true)
      say "sweep: deleting $(wc -l <<<"$groups") consumer groups of finished test processes"
      xargs -r -n 200 <<<"$groups" | while read -r batch; do
        alt=()
        for g in $batch; do alt+=(--group "$g"); done
        kafka_tool org.apache.kafka.tools.consumer.group.ConsumerGroupCommand --bootstrap-server "$boot" \
          --delete "${alt[@]}" >/dev/null 2>&1 || true
      done
    fi
  fi
  if command -v psql >/dev/null && psql "$(pg_url)" -qAtc 'select 1' >/dev/null 2>&1; then
    names=$(psql "$(pg_url)" -qAtc "select nspname from pg_namespace where nspname ~ '^t_[0-9]+_'")
    pids=$(dead_test_pids <<<"$names" | paste -sd'|' -)
    if [[ -n "$pids" ]]; then
      local schemas; schemas=$(grep -E "^t_($pids)_" <<<"$names" || true)
      say "sweep: dropping $(wc -l <<<"$schemas") PostgreSQL schemas of finished test processes"
      while read -r schema; do
        psql "$(pg_url)" -qAtc "drop schema if exists \"$schema\" cascade" >/dev/null 2>&1 || true
      done <<<"$schemas"
    fi
  fi
  if command -v redis-cli >/dev/null && redis_ping; then
    names=$(redis_cli --scan --pattern 't-*')
    pids=$(dead_test_pids <<<"$names" | paste -sd'|' -)
    if [[ -n "$pids" ]]; then
      local keys; keys=$(grep -E "^t-($pids)-" <<<"$names" || true)
      say "sweep: deleting $(wc -l <<<"$keys") Redis keys of finished test processes"
      xargs -r -n 500 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" unlink <<<"$keys" >/dev/null
    fi
  fi
  # The processor's state directories (processor.state_dir, default <tmp>/presence-state;
  # one per <group_id>.<instance>) that a killed test processor left.
  local state="${TMPDIR:-/tmp}/presence-state"
  if [[ -d "$state" ]]; then
    names=$(ls "$state")
    pids=$(dead_test_pids <<<"$names" | paste -sd'|' -)
    if [[ -n "$pids" ]]; then
      local dirs; dirs=$(grep -E "^t-($pids)-" <<<"$names" || true)
      say "sweep: deleting $(wc -l <<<"$dirs") processor state directories of finished test processes"
      while read -r d; do rm -rf -- "${state:?}/$d"; done <<<"$dirs"
    fi
  fi
  return 0
}

up() {
  mkdir -p "$STACK_DIR"
  command -v java >/dev/null || apt_install openjdk-17-jre-headless
  deps
  kafka_up
  redis_up
  pg_up
  registry_up
  status
}

kafka_down() { kafka_node_stop "$STACK_DIR/kafka"; }

redis_down() {
  if [[ -f "$STACK_DIR/redis/redis.pid" ]]; then
    say "redis: stopping"
    redis_cli shutdown >/dev/null 2>&1 || true
    local deadline=$((SECONDS + 30))
    while redis_cli ping >/dev/null 2>&1 && ((SECONDS < deadline)); do sleep 0.2; done
    rm -f "$STACK_DIR/redis/redis.pid"
  fi
}

pg_down() {
  if [[ -f "$PG_DATA/postmaster.pid" ]]; then
    say "postgres: stopping"
    as_root runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null || true
  fi
}

down() {
  kafka_down
  redis_down
  pg_down
  registry_down
}

status() {
  local ok=0
  if port_open "$KAFKA_PORT"; then say "kafka     up    KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT   log $STACK_DIR/kafka/server.log"; else say "kafka     DOWN"; ok=1; fi
  if redis_ping; then say "redis     up    REDIS_URL=redis$(redis_tls && echo s)://127.0.0.1:$REDIS_PORT   log $STACK_DIR/redis/redis.log"; else say "redis     DOWN"; ok=1; fi
  if psql "$(pg_url)" -qAtc 'select 1' >/dev/null 2>&1; then say "postgres  up    DATABASE_URL=$(pg_url | sed 's/:[^:@]*@/:***@/')   log $PG_DATA/server.log"; else say "postgres  DOWN"; ok=1; fi
  if registry_ready; then say "registry  up    PRESENCE_SCHEMA_REGISTRY__URL=$(registry_url)   log $STACK_DIR/registry/registry.log"; else say "registry  DOWN"; ok=1; fi
  say "kafka jars: $KAFKA_LIBS"
  return $ok
}


# --- Monitoring and packaging tools -----------------------------------------------------
# Prometheus from Debian's package, run from the command line with a configuration and data
# directory of its own (PROM_DIR, default $STACK_DIR/prometheus), on 127.0.0.1:PROM_PORT
# (9090). It scrapes PROM_TARGETS ("<process>=<host:port> ...", default the four ops ports of
# `make up`) every PROM_SCRAPE_INTERVAL (5s), one job `presence-<process>` each, and
# evaluates deploy/prometheus/rules/*.yml. Idempotent: a running one with the same
# configuration is reused; a changed configuration is reloaded.
PROM_PORT="${PROM_PORT:-9090}"
PROM_DIR="${PROM_DIR:-$STACK_DIR/prometheus}"
PROM_TARGETS="${PROM_TARGETS:-processor=127.0.0.1:9101 notifier=127.0.0.1:9102 sink=127.0.0.1:9103 gateway=127.0.0.1:9104}"
PROM_SCRAPE_INTERVAL="${PROM_SCRAPE_INTERVAL:-5s}"

prometheus_config() {
  printf 'global:\n  scrape_interval: %s\n  evaluation_interval: %s\n' "$PROM_SCRAPE_INTERVAL" "$PROM_SCRAPE_INTERVAL"
  printf 'rule_files:\n  - %s/deploy/prometheus/rules/*.yml\n' "$ROOT"
  printf 'scrape_configs:\n'
  local t
  for t in $PROM_TARGETS; do
    [[ "$t" == *=*:* ]] || die "PROM_TARGETS entry '$t' is not <process>=<host:port>"
    printf '  - job_name: presence-%s\n    static_configs:\n      - targets: ["%s"]\n' "${t%%=*}" "${t#*=}"
  done
}

prometheus_ready() { curl -sf "http://127.0.0.1:$PROM_PORT/-/ready" >/dev/null; }

prometheus_up() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null || apt_install prometheus
  mkdir -p "$PROM_DIR/data"
  prometheus_config >"$PROM_DIR/prometheus.yml.new"
  promtool check config "$PROM_DIR/prometheus.yml.new" >"$PROM_DIR/check.log" 2>&1 \
    || { cat "$PROM_DIR/check.log" >&2; die "the generated Prometheus configuration is invalid (PROM_TARGETS?)"; }
  local pid=""
  [[ -f "$PROM_DIR/prometheus.pid" ]] && pid=$(cat "$PROM_DIR/prometheus.pid")
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && prometheus_ready; then
    if cmp -s "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml"; then
      rm -f "$PROM_DIR/prometheus.yml.new"
      say "prometheus: reusing what answers on http://127.0.0.1:$PROM_PORT"; return 0
    fi
    mv "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml"
    say "prometheus: configuration changed; reloading"
    kill -HUP "$pid"; return 0
  fi
  port_open "$PROM_PORT" && die "port $PROM_PORT is taken by something else; set PROM_PORT"
  mv "$PROM_DIR/prometheus.yml.new" "$PROM_DIR/prometheus.yml"
  say "prometheus: starting on http://127.0.0.1:$PROM_PORT (log $PROM_DIR/prometheus.log)"
  nohup prometheus --config.file="$PROM_DIR/prometheus.yml" --storage.tsdb.path="$PROM_DIR/data" \
    --storage.tsdb.retention.time=2d --web.listen-address="127.0.0.1:$PROM_PORT" \
    --web.enable-lifecycle >"$PROM_DIR/prometheus.log" 2>&1 </dev/null &
  echo $! >"$PROM_DIR/prometheus.pid"
  wait_for 60 "prometheus on 127.0.0.1:$PROM_PORT" "$PROM_DIR/prometheus.log" prometheus_ready
}

prometheus_down() {
  [[ -f "$PROM_DIR/prometheus.pid" ]] || return 0
  local pid; pid=$(cat "$PROM_DIR/prometheus.pid")
  if kill -0 "$pid" 2>/dev/null; then
    say "prometheus: stopping"
    kill "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  fi
  rm -f "$PROM_DIR/prometheus.pid"
}

# The alert and recording rules: syntax, then their unit tests.
prometheus_rules_test() {
  command -v promtool >/dev/null || apt_install prometheus
  promtool check rules "$ROOT"/deploy/prometheus/rules/*.yml
  promtool test rules "$ROOT"/deploy/prometheus/tests/*.yml
}

# Helm 4 built from the Go module proxy (no other download), cached; prints its path.
HELM_VERSION="${HELM_VERSION:-v4.3.1}"
helm_bin() {
  local dir="$CACHE/helm-$HELM_VERSION"
  if [[ ! -x "$dir/helm" ]]; then
    command -v go >/dev/null || die "helm is built with Go (go install); install Go 1.24+ first"
    say "building helm $HELM_VERSION into $dir (go install, ~2 min the first time)" >&2
    GOBIN="$dir" go install "helm.sh/helm/v4/cmd/helm@$HELM_VERSION" >&2 \
      || die "go install helm.sh/helm/v4/cmd/helm@$HELM_VERSION failed; check access to the Go module proxy"
  fi
  echo "$dir/helm"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) status ;;
  deps) mkdir -p "$STACK_DIR"; deps ;;
  kafka-up) mkdir -p "$STACK_DIR"; kafka_up ;;
  kafka-down) kafka_down ;;
  cluster-up) mkdir -p "$STACK_DIR"; cluster_up ;;
  cluster-down) cluster_down ;;
  cluster-status) cluster_status ;;
  cluster-brokers) cluster_brokers ;;
  # One node of the cluster, for fault injection: start, clean stop, kill -9.
  cluster-node-up) mkdir -p "$STACK_DIR"; cluster_node_up "${2:?node 1..3}" ;;
  cluster-node-down) kafka_node_stop "$(cluster_dir "${2:?node 1..3}")" ;;
  cluster-node-kill) kafka_node_stop "$(cluster_dir "${2:?node 1..3}")" KILL ;;
  redis-up) mkdir -p "$STACK_DIR"; redis_up ;;
  redis-down) redis_down ;;
  pg-up) pg_up ;;
  pg-down) pg_down ;;
  registry-up) mkdir -p "$STACK_DIR"; registry_up ;;
  registry-down) registry_down ;;
  registry-url) registry_url ;;
  sweep) sweep ;;
  tls-certs) tls_certs "${2:?usage: deploy/stack.sh tls-certs DIR}" ;;
  node-modules) echo "$CACHE/node/node_modules" ;;
  kafka-libs) echo "$KAFKA_LIBS" ;;
  venv-python) echo "$VENV/bin/python" ;;
  prometheus-up) mkdir -p "$STACK_DIR"; prometheus_up ;;
  prometheus-down) prometheus_down ;;
  prometheus-rules-test) prometheus_rules_test ;;
  helm) helm_bin ;;
  *) die "unknown command '$1': use up, down, status, deps, tls-certs DIR, <kafka|redis|pg|registry|cluster|prometheus>-<up|down>, registry-url, prometheus-rules-test, helm, cluster-status, cluster-node-<up|down|kill> N" ;;
esac
