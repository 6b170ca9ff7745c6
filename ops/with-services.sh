#!/usr/bin/env bash
# ops/with-services.sh COMMAND [ARG...]
#
# Runs COMMAND with a private, throwaway Postgres and Redis on free ports, both gone afterwards
# whatever happens (the EXIT trap stops them and removes their folder). COMMAND sees:
#   DATABASE_URL, HANGAR_TEST_DATABASE_URL   postgres://hangar@127.0.0.1:PORT/hangar
#   REDIS_URL, HANGAR_TEST_REDIS_URL         redis://127.0.0.1:PORT
#   HANGAR_SERVICES_DIR                      their folder (logs: postgres/server.log, redis.log)
# Tuned for tests, not for keeping data: no fsync, 500 connections, Redis without persistence.
# The exit status is COMMAND's. Needs ops/install-deps.sh to have run.
set -euo pipefail

say() { printf '==== %s\n' "$*" >&2; }
die() {
    printf 'with-services: %s\n' "$*" >&2
    exit 1
}

[ $# -gt 0 ] || die "usage: ops/with-services.sh COMMAND [ARG...]"

# The newest server under /usr/lib/postgresql (Debian keeps it off PATH), unless HANGAR_PG_BIN.
pg_bin=${HANGAR_PG_BIN:-$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)}
[ -x "$pg_bin/pg_ctl" ] && [ -x "$pg_bin/initdb" ] ||
    die "PostgreSQL server binaries not found (set HANGAR_PG_BIN or run ops/install-deps.sh)"
command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    die "redis-server not found (run ops/install-deps.sh)"

# Postgres refuses to run as root: as root, its tools run as the postgres user.
as_pg=()
if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || die "no postgres user (install the postgresql package)"
    as_pg=(runuser -u postgres --)
fi

# Under /tmp and world-searchable, so that the postgres user can reach its folder in it.
work=$(mktemp -d /tmp/hangar-services.XXXXXX)
chmod 755 "$work"
pg_dir=$work/postgres
pg_started=""
redis_pid=""

cleanup() {
    local status=$?
    set +e
    if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
        kill -TERM "$redis_pid"
        for _ in $(seq 100); do
            kill -0 "$redis_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$redis_pid" 2>/dev/null
    fi
    if [ -n "$pg_started" ]; then
        # Fast shutdown (clients are disconnected); immediate if that does not finish in 10 s.
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m fast -w -t 10 stop >/dev/null 2>&1 ||
            "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate -w -t 10 stop >/dev/null 2>&1
    fi
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
# Until COMMAND runs, Ctrl-C and SIGTERM end the script (through the EXIT trap).
trap 'exit 130' INT
trap 'exit 143' TERM

# A port nothing listens on, below the ephemeral range (32768+) so that outgoing connections
# do not take it meanwhile. Should another process bind it first, the start is retried.
free_port() {
    local port
    for _ in $(seq 100); do
        port=$((15000 + RANDOM % 17000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    die "no free port found"
}

tail_log() {
    printf -- '---- end of %s:\n' "$1" >&2
    tail -n 30 "$1" >&2 || true
}

say "starting Postgres ($pg_bin) in $pg_dir"
mkdir -p "$pg_dir/socket"
[ ${#as_pg[@]} -eq 0 ] || chown -R postgres:postgres "$pg_dir"
"${as_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -A trust -U hangar -E UTF8 --locale=C --no-sync \
    >"$work/initdb.log" 2>&1 || { tail_log "$work/initdb.log"; die "initdb failed"; }
pg_fast="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
pg_started=1 # from here on, the trap stops whatever server runs on the folder
for attempt in 1 2 3; do
    pg_port=$(free_port)
    # pg_ctl -w returns once the server accepts connections; the server runs in its own session,
    # so a Ctrl-C on the terminal reaches only this script, which then stops it.
    if "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/server.log" -w -t 30 -s \
        -o "-p $pg_port -k $pg_dir/socket -c listen_addresses=127.0.0.1 -c max_connections=500 $pg_fast" \
        start; then
        break
    fi
    tail_log "$pg_dir/server.log"
    [ "$attempt" -lt 3 ] || die "Postgres did not start"
done
"$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U hangar hangar

say "starting Redis in $work/redis"
mkdir -p "$work/redis"
for attempt in 1 2 3; do
    redis_port=$(free_port)
    # Not daemonized, so that $! is the server; setsid keeps the terminal's Ctrl-C off it.
    setsid redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$work/redis" --daemonize no >"$work/redis.log" 2>&1 </dev/null &
    redis_pid=$!
    for _ in $(seq 100); do
        [ "$(redis-cli -p "$redis_port" ping 2>/dev/null)" = PONG ] && break 2
        kill -0 "$redis_pid" 2>/dev/null || break
        sleep 0.1
    done
    tail_log "$work/redis.log"
    kill -KILL "$redis_pid" 2>/dev/null || true
    [ "$attempt" -lt 3 ] || die "Redis did not start"
done

export DATABASE_URL="postgres://hangar@127.0.0.1:$pg_port/hangar"
export HANGAR_TEST_DATABASE_URL=$DATABASE_URL
export REDIS_URL="redis://127.0.0.1:$redis_port"
export HANGAR_TEST_REDIS_URL=$REDIS_URL
export HANGAR_SERVICES_DIR=$work
say "Postgres: $DATABASE_URL"
say "Redis:    $REDIS_URL"

# Not exec: the trap must run when COMMAND ends. COMMAND runs in the background so that a
# signal sent to this script alone (SIGTERM from `timeout`, a CI runner) is handled at once:
# passed on to COMMAND, whose end then stops the services. A Ctrl-C on the terminal reaches
# COMMAND directly, as it shares our process group. (`trap -` undoes the SIGINT/SIGQUIT
# ignoring bash imposes on background commands; `<&0` keeps stdin, not /dev/null.)
# The handlers only pass the signal on: a `wait` inside a trap handler can miss the end of
# the command and block (a bash race seen here), so the waiting stays in the loop below.
command_pid=""
signalled=""
forward() {
    [ -n "$command_pid" ] || exit "$2"
    signalled=$2
    kill -s "$1" "$command_pid" 2>/dev/null || true
}
trap 'forward INT 130' INT
trap 'forward TERM 143' TERM
(
    trap - INT QUIT TERM
    exec "$@"
) <&0 &
command_pid=$!
while :; do
    # Returns the command's status, or >128 early when a trapped signal arrives.
    wait "$command_pid" && status=0 || status=$?
    kill -0 "$command_pid" 2>/dev/null || break
done
exit "${signalled:-$status}" # through the EXIT trap
