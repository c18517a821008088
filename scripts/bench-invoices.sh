#!/usr/bin/env bash
# `make bench-invoices`: close a month for CUSTOMERS customers (default 100,000)
# against the test ClickHouse (port 28123), in a fresh database.
#
#   CUSTOMERS=100000 scripts/bench-invoices.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export IDLEMETER_RUN_DIR=$PWD/.run/test IDLEMETER_CH_HTTP_PORT=28123 IDLEMETER_CH_TCP_PORT=29000 \
    IDLEMETER_KAFKA_PORT=29092 IDLEMETER_KAFKA_STORAGE=memory
scripts/services.sh start >/dev/null
export IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 RUST_LOG=warn
exec cargo bench -p idlemeter-tests --bench close_month
