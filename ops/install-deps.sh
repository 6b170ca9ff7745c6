#!/usr/bin/env bash
# Installs, on Debian 12, what `hangar dev` and the tests need and the machine lacks:
#   - the PostgreSQL server (15: initdb, postgres, pg_ctl under /usr/lib/postgresql/15/bin),
#   - redis-server (and redis-cli, which comes with it),
#   - psql (ops/sqlx-prepare.sh), jq and curl (the README's walkthrough),
#   - prometheus (cli/tests/metrics.rs scrapes a cluster with the real server),
#   - chromium, node and npm (cli/tests/dashboard.rs drives the dashboard in headless
#     Chromium with Playwright; `npm ci --prefix tests/browser` fetches playwright-core),
#   - a C compiler and libc headers (the `ring` crate behind rustls compiles C),
#   - for real microVMs (ops/build-guest-image.sh, the qemu driver, guest/tests/vm.rs):
#     QEMU 10 from bookworm-backports (Debian 12's own 7.2 conflicts with the backported
#     qemu-utils some machines ship), and what the guest image is built with: busybox-static,
#     lz4, cpio, kmod, e2fsprogs; the backports suite is added on the mirror already in use.
# Protobuf needs nothing: the build compiles the .proto files with protox, in Rust.
# Hangar runs private Postgres and Redis instances (and the tests their own Prometheus), so
# the services these packages start (a cluster on 5432, a Redis on 6379, a Prometheus on 9090)
# are stopped and disabled, with or without systemd.
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
# prometheus: the metrics test scrapes a running cluster with the real server.
# chromium, node, npm: the dashboard's browser test.
for tool in psql:postgresql-client jq:jq curl:curl prometheus:prometheus chromium:chromium \
    node:nodejs npm:npm; do
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

# The guest image's build tools; busybox by package, since only the static build can go into
# an initramfs (a plain `busybox` on PATH may be the dynamically linked one).
for pkg in busybox-static lz4 cpio kmod e2fsprogs; do
    if dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed'; then
        say "$pkg: present"
    else
        missing+=("$pkg")
    fi
done

# QEMU 10.0 comes from bookworm-backports: Debian 12's qemu-system-x86 7.2 is older than what
# the qemu driver is measured with (VMM.md) and is blocked by a backported qemu-utils.
qemu_version() {
    # Only an installed package counts (a removed one keeps its version in "config-files").
    dpkg-query -W -f '${Status} ${Version}\n' "$1" 2>/dev/null |
        sed -n 's/^install ok installed [0-9]*:\{0,1\}\([0-9]*\)\..*/\1/p'
}
backports=()
for pkg in qemu-system-x86 qemu-utils; do
    major=$(qemu_version "$pkg")
    if [ -n "$major" ] && [ "$major" -ge 10 ]; then
        say "$pkg: present ($(dpkg-query -W -f '${Version}' "$pkg"))"
    else
        backports+=("$pkg")
    fi
done

has_backports() {
    grep -rqs --include='*.list' --include='*.sources' -E '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/
}
# The URIs serving the plain `bookworm` suite, deb822 files first. Either kind of file may be
# missing (this machine kind has no /etc/apt/sources.list), which is not an error.
debian_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'FNR == 1 {uri = ""} /^URIs:/ {uri = $2}
             /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm" && uri != "") print uri}
             /^[[:space:]]*$/ {uri = ""}' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # One-line format; drop the `[arch=… signed-by=…]` options first.
        awk '{sub(/\[[^]]*\][[:space:]]*/, "")} $1 == "deb" && $3 == "bookworm" {print $2}' "$f"
    done
}
if [ ${#backports[@]} -gt 0 ] && ! has_backports; then
    # The mirror the machine already uses for bookworm (deb822 or one-line format).
    mirror=$(debian_mirror | sed -n 1p)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "adding the bookworm-backports apt source on $mirror"
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
        "$mirror" | "${sudo[@]}" tee /etc/apt/sources.list.d/backports.sources >/dev/null
fi

if [ ${#missing[@]} -gt 0 ] || [ ${#backports[@]} -gt 0 ]; then
    "${sudo[@]}" apt-get update -q
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing: ${missing[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if [ ${#backports[@]} -gt 0 ]; then
    say "installing from bookworm-backports: ${backports[*]}"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends -t bookworm-backports "${backports[@]}"
fi

# The distro services. Only these are touched (by unit, init script, cluster or their own pid
# file), never another Postgres or Redis that happens to run on the machine.
if [ -d /run/systemd/system ]; then
    for unit in postgresql redis-server prometheus; do
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
    if [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
        say "stopping the distro's prometheus"
        "${sudo[@]}" /etc/init.d/prometheus stop
    fi
    for service in postgresql redis-server prometheus; do
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
