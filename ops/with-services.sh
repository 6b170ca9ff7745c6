#!/usr/bin/env bash
# Runs a command with a private, throw-away Postgres and Redis on free ports:
#   ops/with-services.sh <command...>
# Exports DATABASE_URL / HANGAR_TEST_DATABASE_URL and REDIS_URL / HANGAR_TEST_REDIS_URL,
# and stops both servers (and removes their data) when the command ends, whatever happens.
set -euo pipefail

PG_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

WORK=$(mktemp -d /tmp/hangar-services.XXXXXX)
chmod 755 "$WORK"
PG_PORT=$(free_port)
REDIS_PORT=$(free_port)
REDIS_PID=""

cleanup() {
  if [ -n "$REDIS_PID" ]; then
    kill "$REDIS_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$REDIS_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$REDIS_PID" 2>/dev/null || true
  fi
  if [ -f "$WORK/pg/data/postmaster.pid" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" stop -m immediate -w >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }


echo "==> starting Postgres on 127.0.0.1:$PG_PORT and Redis on 127.0.0.1:$REDIS_PORT"
mkdir -p "$WORK/pg"
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK/pg"
as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -A trust -U hangar -E UTF8 >/dev/null
# pg_ctl daemonises Postgres and waits until it accepts connections.
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w -t 60 start -o \
  "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=500" >/dev/null \
  || { cat "$WORK/pg/log"; echo "Postgres failed to start"; exit 1; }
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!

psql -h 127.0.0.1 -p "$PG_PORT" -U hangar -d postgres -qAt -c 'create database hangar' >/dev/null
for _ in $(seq 1 100); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done

export DATABASE_URL="postgres://hangar@127.0.0.1:$PG_PORT/hangar"
export HANGAR_TEST_DATABASE_URL="$DATABASE_URL"
export REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
export HANGAR_TEST_REDIS_URL="$REDIS_URL"

"$@"
