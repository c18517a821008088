#!/usr/bin/env bash
# `make bench-policy`: the idle policy's engine throughput and its
# sample -> command latency through the real broker and ClickHouse.
#
#   SANDBOXES=100000,1000000 WINDOW_S=10 TICKS=25 scripts/bench-policy.sh
#   (NODES defaults to a thousand sandboxes a node)
#
# Uses the test servers (ports 28123 / 29092, memory broker) and a fresh
# database and topics per run.
set -euo pipefail
cd "$(dirname "$0")/.."
export IDLEMETER_RUN_DIR=$PWD/.run/test IDLEMETER_CH_HTTP_PORT=28123 IDLEMETER_CH_TCP_PORT=29000 \
    IDLEMETER_KAFKA_PORT=29092 IDLEMETER_KAFKA_STORAGE=memory
scripts/services.sh start >/dev/null
export IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 RUST_LOG=warn
exec cargo bench -p idlemeter-policy --bench decision_latency
