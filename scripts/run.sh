#!/usr/bin/env bash
# `make run`: the whole stack on this machine. Starts ClickHouse and a durable
# broker (scripts/services.sh), migrates, then runs ingest, the rater, the idle
# policy, the usage API and a simulated fleet
# in the foreground until Ctrl-C, and says where to look.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/idlemeter
# Logs go where the servers' state goes (scripts/services.sh's run directory).
logs=${IDLEMETER_RUN_DIR:-$PWD/.run}
mkdir -p "$logs"
eval "$(scripts/services.sh start)"
export IDLEMETER_CLICKHOUSE__URL IDLEMETER_KAFKA__BROKERS IDLEMETER_LEDGER__URL
# The local broker is tansu; with memory storage (used until the durable one
# is built) it serves a fetch that starts inside a record batch from the next
# batch: one message a batch (README, "Brokers").
export IDLEMETER_KAFKA__SINGLE_MESSAGE_BATCHES=true
# CLUSTER=1: the local ClickHouse cluster (ZooKeeper, two shards, three
# servers) instead of the single server; every service runs against ch1.
if [ "${CLUSTER:-0}" = 1 ]; then
    eval "$(scripts/services.sh start-cluster)"
    export IDLEMETER_CLICKHOUSE__URL IDLEMETER_CLICKHOUSE__CLUSTER
fi
$bin migrate

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    echo "run: services and simulator stopped; servers still up (make services-stop stops them)"
}
trap cleanup EXIT
trap 'exit 0' INT TERM
# Fresh keys for this run: the command key policy and collectors share, and
# the key the API seals alert secrets with (printed nowhere).
random_hex() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
export IDLEMETER_POLICY__COMMAND_KEY IDLEMETER_COLLECTOR__COMMAND_KEY IDLEMETER_API__SECRETS_KEY
IDLEMETER_POLICY__COMMAND_KEY=${IDLEMETER_POLICY__COMMAND_KEY:-$(random_hex)}
IDLEMETER_COLLECTOR__COMMAND_KEY=$IDLEMETER_POLICY__COMMAND_KEY
IDLEMETER_API__SECRETS_KEY=${IDLEMETER_API__SECRETS_KEY:-$(random_hex)}

# Meters over usage events (POST /api/v1/events), read by ingest and the API.
export IDLEMETER_EVENTS__METERS=${METERS:-meters/openmeter-quickstart.toml}
IDLEMETER_METRICS__LISTEN=127.0.0.1:9464 $bin ingest 2>"$logs"/ingest.log & pids+=($!)
# The rater rates each closed hour; a short grace so the demo shows money soon.
IDLEMETER_METRICS__LISTEN=127.0.0.1:9465 IDLEMETER_RATER__SHEET=${SHEET:-prices/northflank.toml} \
    IDLEMETER_RATER__GRACE_SECONDS=60 $bin rater 2>"$logs"/rater.log & pids+=($!)
# The idle policy decides suspends (no collector acts on them in this demo).
IDLEMETER_METRICS__LISTEN=127.0.0.1:9466 IDLEMETER_POLICY__FILE=${POLICY:-policies/sprites.toml} \
    $bin policy 2>"$logs"/policy.log & pids+=($!)
# The usage API, with a fresh admin key for this run (shown once, below).
admin_key=$($bin keys create --admin --name "make run" 2>/dev/null)
ingest_key=$($bin keys create --ingest --name "make run events" 2>/dev/null)
IDLEMETER_METRICS__LISTEN=127.0.0.1:9467 IDLEMETER_API__LISTEN=127.0.0.1:8080 \
    IDLEMETER_RATER__SHEET=${SHEET:-prices/northflank.toml} $bin api 2>"$logs"/api.log & pids+=($!)
# The simulator stands in for node collectors (`idlemeter collector` needs one
# cgroup per sandbox on a real node).
$bin simulate --sandboxes "${SANDBOXES:-500}" --nodes "${NODES:-5}" 2>"$logs"/simulate.log & pids+=($!)

ch=$IDLEMETER_CLICKHOUSE__URL
cat <<INFO

idlemeter is running.
  ClickHouse     $ch   (database idlemeter)
  latest samples curl -s '$ch/?query=SELECT+sandbox,state,seq,cpu_used_usec+FROM+idlemeter.usage_samples+ORDER+BY+ts_ms+DESC+LIMIT+5'
  by hour        curl -s '$ch/?query=SELECT+hour,uniqExactMerge(samples)+FROM+idlemeter.usage_hourly+GROUP+BY+hour+ORDER+BY+hour'
  ingest metrics http://127.0.0.1:9464/metrics   (health: /health)
  rater metrics  http://127.0.0.1:9465/metrics   (rated_usage fills as each hour closes)
  policy metrics http://127.0.0.1:9466/metrics
  api metrics    http://127.0.0.1:9467/metrics   (every service: /health says what it waits for)
  decisions      curl -s '$ch/?query=SELECT+sandbox,rule,action,reason+FROM+idlemeter.policy_decisions+ORDER+BY+at_ms+DESC+LIMIT+5'
  money so far   curl -s -H 'Authorization: Bearer $admin_key' 'http://127.0.0.1:8080/v1/customers/cust-00000/cost'
                 (live: the rater rates the open hour every 5 s; closed hours land in rated_usage)
  usage API      http://127.0.0.1:8080/docs   (admin key: $admin_key)
                 curl -s -H 'Authorization: Bearer $admin_key' 'http://127.0.0.1:8080/v1/customers/cust-00000/sandboxes'
  an event       curl -s -H 'Authorization: Bearer $ingest_key' -H 'Content-Type: application/cloudevents+json' \\
                   -d '{"specversion":"1.0","type":"prompt","id":"1","source":"demo","subject":"cust-00000","data":{"tokens":42,"model":"m1","type":"input"}}' \\
                   http://127.0.0.1:8080/api/v1/events
                 curl -s -H 'Authorization: Bearer $admin_key' 'http://127.0.0.1:8080/api/v1/meters/tokens_total/query?customer=cust-00000&from=2020-01-01T00:00:00Z&to=2100-01-01T00:00:00Z'
  logs           $logs/ingest.log rater.log policy.log api.log simulate.log (and the servers' logs beside them)
Ctrl-C stops the services and the simulator.

INFO
# Usage billed so far in the open period, over every customer: each
# customer's newest live figure (the rater refreshes it every 5 s).
money_sql="SELECT count(), sum(usage) FROM (SELECT customer, argMax(usage, as_of) AS usage FROM (SELECT customer, as_of, sum(amount) AS usage FROM idlemeter.live_usage FINAL WHERE kind = 'usage' AND period_start = (SELECT max(period_start) FROM idlemeter.live_usage) GROUP BY customer, as_of) GROUP BY customer)"
started=$SECONDS
first_samples="" first_money=""
while sleep 5; do
    rows=$(curl -s "$ch/?query=SELECT+count()+FROM+idlemeter.usage_samples" || echo "?")
    money=$(curl -s --data-binary "$money_sql" "$ch/" | tr '\t' ' ' || echo "? ?")
    read -r customers amount <<<"$money"
    [ -z "$first_samples" ] && [ "${rows:-0}" != "0" ] && [ "$rows" != "?" ] && first_samples=$((SECONDS - started))
    [ -z "$first_money" ] && [ "${customers:-0}" != "0" ] && [ "$customers" != "?" ] && first_money=$((SECONDS - started))
    echo "run: ${rows} samples in ClickHouse; usage billed so far: ${amount:-0} over ${customers:-0} customers (live)${first_money:+; first money after ${first_money} s}"
done
