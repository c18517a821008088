#!/usr/bin/env bash
# `make bench-api`: latency of "usage and cost of one customer for a month, by
# day" through the usage API, with >= 100M samples stored.
#
# Loads (once; kept between runs) database `api_bench` on the `make run`
# ClickHouse (port 18123): 10 customers x 4 sandboxes sampled every second for
# the 30 days of October 2026 (103,680,000 samples; the materialized view builds
# the hourly rollup as for real ingest), plus one rated snapshot per customer
# and hour (what the online rater writes). Then runs the bench binary, which
# starts the API in-process and measures both calls.
#
#   scripts/bench-api.sh                 # load if needed, then measure
#   RELOAD=1 scripts/bench-api.sh        # drop and load again
#   DAYS=3 scripts/bench-api.sh          # a smaller load (not the 100M figure)
set -euo pipefail
cd "$(dirname "$0")/.."
DAYS=${DAYS:-30}
DB=${BENCH_DB:-api_bench}
START=1790812800 # 2026-10-01T00:00:00Z
SANDBOXES=40     # 10 customers x 4
scripts/services.sh start >/dev/null
ch=http://127.0.0.1:18123
q() { curl -sSf "$ch/" --data-binary "$1"; }

if [[ "${RELOAD:-0}" == 1 ]]; then q "DROP DATABASE IF EXISTS $DB"; fi
export IDLEMETER_CLICKHOUSE__URL=$ch IDLEMETER_CLICKHOUSE__DATABASE=$DB RUST_LOG=warn
q "CREATE DATABASE IF NOT EXISTS $DB"
cargo run --release --quiet --bin idlemeter -- migrate >/dev/null

want=$((DAYS * 86400 * SANDBOXES))
have=$(q "SELECT count() FROM $DB.usage_samples")
if [[ "$have" != "$want" ]]; then
    echo "loading $want samples into $DB ($have there now; truncating)"
    for table in usage_samples usage_minutes usage_hours rated_usage live_usage; do q "TRUNCATE TABLE $DB.$table"; done
    began=$(date +%s)
    # The columns of migration 0001 (later ones add more, with defaults).
    sample_columns="customer, sandbox, node, epoch, seq, ts, ts_ms, state, vcpu_milli, mem_bytes, gpu_model, gpu_count, disk_bytes, cpu_used_usec, net_rx_bytes, net_tx_bytes, vcpu_alloc_usec, mem_alloc_kib_ms, mem_used_kib_ms, gpu_alloc_ms, disk_mib_ms, api_calls, mem_used_bytes, exec_sessions, open_conns"
    for ((day = 0; day < DAYS; day++)); do
        # One INSERT per day: 3,456,000 rows; n -> (second, sandbox).
        q "INSERT INTO $DB.usage_samples ($sample_columns)
        SELECT
            concat('bench-', toString(intDiv(n % $SANDBOXES, 4))) AS customer,
            concat('sb-', toString(n % $SANDBOXES)) AS sandbox,
            concat('node-', toString(n % 7)) AS node,
            toUInt64(${START}000) AS epoch,
            toUInt64(t + 1) AS seq,
            toDateTime($START + t) AS ts,
            toUInt64(($START + t) * 1000) AS ts_ms,
            if(intDiv(t, 3600) % 24 < 8 AND n % 2 = 1, 'suspended', 'running') AS state,
            toUInt32(2000) AS vcpu_milli,
            toUInt64(4294967296) AS mem_bytes,
            if(n % $SANDBOXES = 0, 'H100', '') AS gpu_model,
            toUInt32(n % $SANDBOXES = 0) AS gpu_count,
            toUInt64(10737418240) AS disk_bytes,
            toUInt64(t * 400000) AS cpu_used_usec,
            toUInt64(t * 1000) AS net_rx_bytes,
            toUInt64(t * 500) AS net_tx_bytes,
            toUInt64(t * 2000000) AS vcpu_alloc_usec,
            toUInt64(t * 4194304000) AS mem_alloc_kib_ms,
            toUInt64(t * 1048576000) AS mem_used_kib_ms,
            toUInt64(t * 1000 * (n % $SANDBOXES = 0)) AS gpu_alloc_ms,
            toUInt64(t * 10240000) AS disk_mib_ms,
            toUInt64(0) AS api_calls,
            toUInt64(1073741824) AS mem_used_bytes,
            toUInt32(n % 3 = 0) AS exec_sessions,
            toUInt32(0) AS open_conns
        FROM (SELECT number AS n, intDiv(number, $SANDBOXES) + $day * 86400 AS t
              FROM system.numbers LIMIT $((86400 * SANDBOXES)))"
        elapsed=$(( $(date +%s) - began )); done_days=$((day + 1))
        per_day=$(( elapsed / done_days ))
        echo "  day $done_days/$DAYS loaded: $((done_days * 86400 * SANDBOXES)) samples in ${elapsed} s, $(( done_days * 86400 * SANDBOXES / (elapsed > 0 ? elapsed : 1) )) samples/s, about $(( per_day * (DAYS - done_days) )) s left"
    done
    # One snapshot per customer and closed hour: vcpu, memory, disk and gpu
    # usage lines, cumulative over the period (as the rater writes them).
    q "INSERT INTO $DB.rated_usage
    SELECT
        concat('bench-', toString(c)) AS customer,
        toDateTime($START) AS period_start,
        toDateTime($START + h * 3600) AS as_of,
        'bench' AS sheet, 'bench-checksum' AS sheet_checksum, 'session-or-connection/v1' AS idle_policy,
        'USD' AS currency,
        toUInt16(l + 1) AS line_no, 'usage' AS kind,
        arrayElement(['vcpu', 'memory', 'disk', 'gpu'], l + 1) AS resource,
        'v1' AS price_version,
        toDecimal128(h * 3600 * 8, 12) AS quantity, 'vcpu_seconds' AS quantity_base, 'unit' AS unit,
        toDecimal128(0.000014, 12) AS unit_price,
        toDecimal128(h * 4032 * (l + 1), 12) / 10000 AS amount,
        toDateTime($START + h * 3600 + 60) AS rated_at
    FROM (SELECT intDiv(number, $((DAYS * 24 * 4))) AS c,
                 intDiv(number % $((DAYS * 24 * 4)), 4) + 1 AS h,
                 number % 4 AS l
          FROM system.numbers LIMIT $((10 * DAYS * 24 * 4)))"
    echo "loaded in $(( $(date +%s) - began )) s"
fi
# Usage windows read the compacted tables (migration 0010): ingest writes a
# row per sandbox-minute, and usage_hours follows from it. The samples loaded
# above went straight to usage_samples, so build their minute rows with the
# migration's own backfill, a day at a time.
minutes=$(q "SELECT count() FROM $DB.usage_minutes")
if [[ "$minutes" == 0 ]]; then
    echo "building minute rows (migration 0010's backfill), a day at a time"
    began=$(date +%s)
    backfill=$(sed -n '/^INSERT INTO usage_minutes/,$p' migrations/0010_compacted.sql | sed 's/;$//')
    backfill=${backfill/INSERT INTO usage_minutes/INSERT INTO $DB.usage_minutes}
    for ((day = 0; day < DAYS; day++)); do
        from=$((START + day * 86400))
        q "${backfill/FROM usage_samples/FROM $DB.usage_samples WHERE ts_ms >= ${from}000 AND ts_ms < $((from + 86400))000}"
        echo "  day $((day + 1))/$DAYS ($(( $(date +%s) - began )) s)"
    done
fi
q "SELECT 'stored: ' || toString(count()) || ' samples, ' || toString((SELECT count() FROM $DB.usage_minutes)) || ' minute rows, ' || toString((SELECT count() FROM $DB.rated_usage)) || ' rated lines' FROM $DB.usage_samples"
q "SELECT 'on disk: ' || formatReadableSize(sum(bytes)) FROM system.parts WHERE active AND database = '$DB'"
BENCH_FROM=$START BENCH_DAYS=$DAYS exec cargo bench -p idlemeter-api --bench month_by_day
