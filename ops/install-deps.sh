#!/usr/bin/env bash
# Installs, on Debian 12, what `hangar dev` and the tests need and the machine lacks:
#   - the PostgreSQL server (15: initdb, postgres, pg_ctl under /usr/lib/postgresql/15/bin),
#   - redis-server (and redis-cli, which comes with it),
#   - psql (ops/sqlx-prepare.sh), jq and curl (the README's walkthrough),
#   - a C compiler and libc headers (the `ring` crate behind rustls compiles C).
# Protobuf needs nothing: the build compiles the .proto files with protox, in Rust.
# Hangar runs private Postgres and Redis instances, so the services these packages start
# (a cluster on 5432, a Redis on 6379) are stopped and disabled, with or without systemd.
# Idempotent: installs only what is missing; `apt-get update` runs only then.
set -euo pipefail

say() { printf 'install-deps: %s\n' "$*"; }

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    sudo=(sudo)
fi

has_pg_server() {
    local dir
    for dir in ${HANGAR_PG_BIN:-} /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ] && [ -x "$dir/pg_ctl" ]; then
            return 0
        fi
    done
    return 1
}

missing=()
if has_pg_server; then
    say "PostgreSQL server: present"
else
    missing+=(postgresql)
fi
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    say "redis-server: present"
else
    missing+=(redis-server)
fi
for tool in psql:postgresql-client jq:jq curl:curl; do
    if command -v "${tool%%:*}" >/dev/null; then
        say "${tool%%:*}: present"
    else
        missing+=("${tool#*:}")
    fi
done
if command -v cc >/dev/null && dpkg -s libc6-dev >/dev/null 2>&1; then
    say "C compiler: present"
else
    missing+=(gcc libc6-dev)
fi

if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The distro services. Only these are touched (by unit, init script, cluster or their own pid
# file), never another Postgres or Redis that happens to run on the machine.
if [ -d /run/systemd/system ]; then
    for unit in postgresql redis-server; do
        if systemctl is-active --quiet "$unit"; then
            say "stopping the distro's $unit service"
            "${sudo[@]}" systemctl stop "$unit"
        fi
        if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
            say "disabling the distro's $unit service"
            "${sudo[@]}" systemctl disable --quiet "$unit"
        fi
    done
else
    # No systemd (a container): apt's postinst may have started them through the init scripts.
    if command -v pg_lsclusters >/dev/null; then
        pg_lsclusters -h | while read -r version cluster _port status _rest; do
            if [ "$status" = online ]; then
                say "stopping the distro's Postgres cluster $version/$cluster"
                "${sudo[@]}" pg_ctlcluster "$version" "$cluster" stop
            fi
        done
    fi
    pidfile=/run/redis/redis-server.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "stopping the distro's redis-server"
        "${sudo[@]}" /etc/init.d/redis-server stop
    fi
    for service in postgresql redis-server; do
        if compgen -G "/etc/rc[2-5].d/S??$service" >/dev/null; then
            say "disabling the distro's $service service at boot"
            "${sudo[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
        fi
    done
fi

if ! command -v cargo >/dev/null; then
    say "note: cargo is not installed; install Rust with rustup (https://rustup.rs)"
elif command -v rustup >/dev/null; then
    # CI's fresh toolchains may come without the tools ops/test.sh runs.
    for component in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$component"; then
            say "adding the rustup component $component"
            rustup component add "$component"
        fi
    done
fi
say "done"
