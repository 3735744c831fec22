# presence: the two commands that matter are `make up` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help
STACK := bash deploy/stack.sh
PRESENCE := target/release/presence

# Where the stack script keeps Kafka's jars and the Python with fastavro; tests read these.
export PRESENCE_TEST_KAFKA_LIBS ?= $(shell bash deploy/stack.sh kafka-libs)
export PRESENCE_TEST_PYTHON ?= $(shell bash deploy/stack.sh venv-python)
# The schema registry `make stack` runs (Apicurio's Confluent-compatible API).
export PRESENCE_TEST_REGISTRY_URL ?= $(shell bash deploy/stack.sh registry-url)

.PHONY: help up down stack stack-down status build topics test unit lint bench cluster cluster-down chaos chaos-short soak scale monitor monitor-down check-packaging

help:
	@echo "make up      bring up Kafka, Redis, PostgreSQL and the pipeline with a demo load"
	@echo "make test    everything CI runs (starts the stack if needed)"
	@echo "make down    stop the pipeline and the stack"
	@echo "make lint    formatting and clippy, as CI runs them before the tests"
	@echo "make cluster a replicated three-node Kafka (RF 3, min ISR 2) with the topics on it"
	@echo "make chaos   the long chaos run: faults under load on a cluster of its own, judged by the ground truth"
	@echo "             (CHAOS_SECONDS=900 CHAOS_SESSIONS=30000 CHAOS_SEED=<n>; make chaos-short: about 3 minutes)"
	@echo "make monitor a real Prometheus on 127.0.0.1:9090 scraping every process, with the alert rules"
	@echo "make soak    30 minutes of steady load with a fault every 5 minutes: memory, stage-2 buffer and latency over time (docs/soak/)"
	@echo "make scale   processor throughput with 1, 2 and 3 instances on the three-node cluster"
	@echo "make stack | stack-down | status | build | topics | unit | bench | cluster-down | monitor-down | check-packaging"

stack:
	@$(STACK) up

# Three Apache Kafka nodes on loopback (ports 19092/19094/19096, controllers one above each),
# a KRaft quorum of three, replication 3 and min ISR 2, and every topic provisioned on it.
# Run any process against it with KAFKA_BROKERS=$$(bash deploy/stack.sh cluster-brokers).
cluster: build
	@$(STACK) deps
	@$(STACK) cluster-up
	KAFKA_BROKERS=$$($(STACK) cluster-brokers) PRESENCE_TOPICS__REPLICATION_FACTOR=3 $(PRESENCE) topics
	@echo "cluster ready: export KAFKA_BROKERS=$$($(STACK) cluster-brokers) PRESENCE_TOPICS__REPLICATION_FACTOR=3"

cluster-down:
	@$(STACK) cluster-down

# The long chaos run (cli/tests/chaos.rs, chaos_long): a three-node cluster, private Redis and
# PostgreSQL, the whole pipeline, seeded overlapping faults under live load; prints the verdict
# table and fails on any failed row.
CHAOS_SECONDS ?= 900
CHAOS_SESSIONS ?= 30000
CHAOS_SEED ?=
# The short run (about 3 minutes of load, one fault of each kind, seed 4 unless CHAOS_SEED says
# otherwise); `make test` runs it too.
chaos-short: stack
	$(if $(CHAOS_SEED),PRESENCE_CHAOS_SEED=$(CHAOS_SEED)) \
	  cargo test --locked -p presence --test chaos -- chaos_short --nocapture

chaos: stack build
	PRESENCE_CHAOS_BIN=$(CURDIR)/$(PRESENCE) PRESENCE_CHAOS_SECONDS=$(CHAOS_SECONDS) PRESENCE_CHAOS_SESSIONS=$(CHAOS_SESSIONS) \
	  $(if $(CHAOS_SEED),PRESENCE_CHAOS_SEED=$(CHAOS_SEED)) \
	  cargo test --locked -p presence --test chaos -- --ignored chaos_long --nocapture

# The soak (presence bench soak): SOAK_MINUTES of 20k heartbeats/s over 200k open sessions on
# the stack's broker, a fault every 5 minutes (kill -9 + restart, scale 1-2-1, SIGSTOP past the
# group session); writes docs/soak/soak.csv and soak.svg. Run it alone: it measures latency.
SOAK_MINUTES ?= 30
soak: stack build
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench soak --minutes $(SOAK_MINUTES)

# Throughput with 1, 2 and 3 processor instances sharing one backlog on the three-node cluster
# (replication 3, min ISR 2), each against a plain consumer's ceiling in the same run. The
# backlog must take much longer to drain than the group takes to settle (2 M heartbeats
# drained in 2-8 s, shorter than the rebalances when instances join).
SCALE_HEARTBEATS ?= 8000000
scale: cluster
	for n in 1 2 3; do \
	  KAFKA_BROKERS=$$($(STACK) cluster-brokers) PRESENCE_TOPICS__REPLICATION_FACTOR=3 PRESENCE_TELEMETRY__LOG_FILTER=warn \
	    $(PRESENCE) bench throughput --heartbeats $(SCALE_HEARTBEATS) --runs 3 --idle-seconds 1 --instances $$n || exit 1; \
	done

stack-down:
	@$(STACK) down

status:
	@$(STACK) status; bash deploy/run.sh status

build:
	cargo build --release --locked -p presence

topics: build
	$(PRESENCE) topics

up: stack build
	$(PRESENCE) topics
	@bash deploy/run.sh start
	@echo
	@echo "presence is running. Where to look:"
	@echo "  dashboard           http://127.0.0.1:8080/   (pick a region; tiles turn online/offline live)"
	@echo "  send a heartbeat    curl -si -H 'content-type: application/json' -d '{\"session_id\":\"s1\",\"user_id\":\"u1\",\"facility_id\":\"f1\",\"region_id\":\"region-0\"}' http://127.0.0.1:8080/v1/heartbeats"
	@echo "  live region stream  curl -N http://127.0.0.1:8080/v1/regions/region-0/stream"
	@echo "  region channel      redis-cli PSUBSCRIBE 'presence:region:*'"
	@echo "  database            psql postgres://presence:presence@127.0.0.1:5432/presence -c 'table presence.facility_status'"
	@echo "  metrics             curl -s http://127.0.0.1:9104/metrics (gateway), :9101 (processor), :9102 (notifier), :9103 (sink)"
	@echo "  demo load           tail -f .run/loadgen.log   (50 facilities x 4 users, a beat every 30 s, through the gateway)"
	@echo "  transitions         java -cp '$(PRESENCE_TEST_KAFKA_LIBS)/*' org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server 127.0.0.1:9092 --topic facility-status --from-beginning --property print.key=true --isolation-level read_committed"
	@echo "  logs                .run/*.log; the stack's logs: make status"
	@echo "  stop                make down"

down:
	@bash deploy/run.sh stop
	@$(STACK) down

# The lint gate CI runs before the tests: the tree is rustfmt-formatted and clippy-clean
# (every target, warnings are errors). `cargo fmt --all` fixes the first.
lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Unit tests only: no services needed.
unit:
	cargo test --workspace --locked --lib --bins

# Prometheus (Debian's package) with its own configuration and data directory under
# ~/.cache/presence/stack/prometheus, scraping the ops ports of `make up`'s processes (jobs
# presence-<process>) and evaluating deploy/prometheus/rules. Idempotent.
monitor:
	@$(STACK) prometheus-up
	@echo "Prometheus: http://127.0.0.1:9090 (targets /targets, alerts /alerts); Grafana dashboard to import: deploy/grafana/presence.json"

monitor-down:
	@$(STACK) prometheus-down

# The Helm chart rendered for every value set and validated strictly against the Kubernetes
# schemas; docker-compose.yml against the Compose Specification.
check-packaging:
	bash deploy/check-packaging.sh

# Sweeps before and after: whatever finished test processes left on the shared stack (topics,
# groups, schemas, keys named after their process id) is removed, even when a test failed or
# was killed, so the broker never accumulates earlier runs' partitions.
#
# Every test binary runs under `timeout` (cargo's runner for the host): one that hangs is killed
# after TEST_BINARY_BUDGET seconds, with whatever it started (brokers, browsers), and reported as
# failed, and the next binaries still run, so a hang ends in a verdict naming the test (libtest
# prints "has been running for over 60 seconds") instead of at CI's own time limit. The
# longest binary (chaos, about 6 minutes) fits three times over.
TEST_BINARY_BUDGET ?= 1200
TEST_RUNNER_VAR := CARGO_TARGET_$(shell rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')_RUNNER
test: stack
	$(STACK) sweep
	$(STACK) prometheus-rules-test
	bash deploy/check-packaging.sh
	$(TEST_RUNNER_VAR)="timeout --kill-after=30 $(TEST_BINARY_BUDGET)" \
	  cargo test --workspace --locked --no-fail-fast; status=$$?; $(STACK) sweep; exit $$status

# Benchmarks: the pure stage-1 core (cargo bench), then the broker-bound ones on topics of
# their own (restore, end-to-end throughput against a plain consumer, latency), the gateway
# under wrk, loadgen straight to Kafka, the sink into PostgreSQL, and SSE fan-out.
bench: stack build
	cargo bench --locked -p presence-processor --bench stage1
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench restore --sessions 1000000
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench restore --sessions 10000000 --partitions 12 --runs 1
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench restore --sessions 1000000 --partitions 12 --runs 3 --quiet 1
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench throughput --heartbeats 4000000
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench throughput --heartbeats 8000000 --sessions 1000000 --idle-seconds 3
	for i in 1 2 3 4 5; do PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench latency --rate 20000 --seconds 60 || exit 1; done
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench offline
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench failover --runs 3
	bash deploy/bench-gateway.sh
	bash deploy/bench-loadgen.sh
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench sink --transitions 200000 --runs 3
	PRESENCE_TELEMETRY__LOG_FILTER=warn $(PRESENCE) bench fanout --clients 1000 --events 100
