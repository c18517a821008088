#!/usr/bin/env bash
# `make bench`: simulator -> Kafka -> ingest -> ClickHouse on this machine.
# Prints sustained samples/s stored, produce->durable latency quantiles from
# ingest's own histogram, and CPU seconds and peak RSS of each process.
#
#   SANDBOXES=100000 NODES=200 TICKS=20 INTERVAL_S=1 scripts/bench-ingest.sh
#
# Uses the test servers (ports 28123 / 29092, memory broker) and a fresh
# database and topic per run.
set -euo pipefail
cd "$(dirname "$0")/.."
sandboxes=${SANDBOXES:-100000}
nodes=${NODES:-200}
ticks=${TICKS:-20}
interval=${INTERVAL_S:-1}
run=bench_$(date +%s)
bin=target/release/idlemeter
export IDLEMETER_RUN_DIR=$PWD/.run/test IDLEMETER_CH_HTTP_PORT=28123 IDLEMETER_CH_TCP_PORT=29000 \
    IDLEMETER_KAFKA_PORT=29092 IDLEMETER_KAFKA_STORAGE=memory
scripts/services.sh start >/dev/null
export IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:28123 IDLEMETER_KAFKA__BROKERS=127.0.0.1:29092 \
    IDLEMETER_CLICKHOUSE__DATABASE=$run IDLEMETER_TOPICS__SAMPLES=$run.samples \
    IDLEMETER_TOPICS__SAMPLES_DEAD_LETTER=$run.dlq IDLEMETER_INGEST__GROUP_ID=$run \
    IDLEMETER_METRICS__LISTEN=127.0.0.1:29464 RUST_LOG=warn
ch=$IDLEMETER_CLICKHOUSE__URL
$bin migrate >/dev/null
$bin ingest 2>".run/$run.ingest.log" & ingest=$!
trap 'kill $ingest 2>/dev/null || true' EXIT
sleep 1
expected=$((sandboxes * ticks))
echo "bench: $sandboxes sandboxes on $nodes nodes, $ticks ticks every ${interval}s = $expected samples"
started=$(date +%s.%N)
/usr/bin/time -f "%e %U %S %M" -o ".run/$run.simulate.time" \
    $bin simulate --sandboxes "$sandboxes" --nodes "$nodes" --ticks "$ticks" --interval-s "$interval" 2>/dev/null &
simulate=$!
stored=0
while [ "$stored" -lt "$expected" ]; do
    sleep 1
    stored=$(curl -s "$ch/?query=SELECT+count()+FROM+$run.usage_samples" || echo 0)
    printf 'bench: %s / %s samples stored\n' "$stored" "$expected"
    if ! kill -0 "$simulate" 2>/dev/null && [ -n "${last:-}" ] && [ "$stored" = "$last" ]; then
        stalls=$(( ${stalls:-0} + 1 )); [ "$stalls" -gt 30 ] && { echo "bench: stalled"; exit 1; }
    fi
    last=$stored
done
finished=$(date +%s.%N)
wait "$simulate"
read -r sim_wall sim_user sim_sys sim_rss <".run/$run.simulate.time"
ingest_cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$ingest/stat")
ingest_rss=$(awk '/VmHWM/ {print $2}' "/proc/$ingest/status")
metrics=$(curl -s http://127.0.0.1:29464/metrics)
quantile() { # from the cumulative histogram buckets of end-to-end seconds
    echo "$metrics" | awk -v q="$1" -F'[{}" ]+' '
        /^idlemeter_ingest_end_to_end_seconds_bucket/ { le[n] = $3; c[n] = $NF; n++ }
        /^idlemeter_ingest_end_to_end_seconds_count/ { total = $NF }
        END { for (i = 0; i < n; i++) if (c[i] >= q * total) { print "<= " le[i] " s"; exit } }'
}
elapsed=$(echo "$finished - $started" | bc -l)
printf 'bench: %d samples stored in %.1f s: %.0f samples/s sustained\n' "$expected" "$elapsed" "$(echo "$expected / $elapsed" | bc -l)"
echo "bench: produce -> stored latency p50 $(quantile 0.5), p99 $(quantile 0.99) (per message, ingest histogram)"
echo "bench: ingest    cpu ${ingest_cpu} s, peak rss $((ingest_rss / 1024)) MiB"
echo "bench: simulate  cpu $(echo "$sim_user + $sim_sys" | bc -l) s, peak rss $((sim_rss / 1024)) MiB, wall ${sim_wall} s"
ch_pid=$(cat .run/test/clickhouse.pid); broker_pid=$(cat .run/test/tansu.pid)
echo "bench: clickhouse cpu $(awk '{print ($14 + $15) / 100}' /proc/$ch_pid/stat) s total since start; broker cpu $(awk '{print ($14 + $15) / 100}' /proc/$broker_pid/stat) s total since start"
