#!/usr/bin/env bash
# ops/bench.sh [SUBCOMMAND [ARG...]]   Hangar's benchmarks (bench/, `hangar-bench`).
#
# Builds `hangar` and `hangar-bench` in release (SQLX_OFFLINE=true; honours CARGO_TARGET_DIR),
# starts a private Postgres and Redis (ops/with-services.sh), runs `hangar migrate`, then runs
# every benchmark in turn — or only the one given — and prints the results as markdown tables
# on stdout (progress and service messages go to stderr). Each benchmark makes a fresh database
# on that server, its own Redis prefix, and kills the `hangar` processes it started.
#   ops/bench.sh                                   pickup, create, throughput, backlog, dashboard, apalis
#   ops/bench.sh backlog --jobs 20000 --workers 1  one benchmark, with its flags
#   ops/bench.sh pickup --help                     a benchmark's flags
#   ops/bench.sh vm [--runs 10] [--accel auto]     real microVMs (qemu driver, guest image in
#                                                  $HANGAR_IMAGE_DIR or .hangar/image); builds
#                                                  only hangar-bench, starts no services
# Numbers depend on the machine and on whatever else runs on it: quote them with both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=${CARGO_TARGET_DIR:-target}
hangar_bin=$target/release/hangar
bench_bin=$target/release/hangar-bench

if [ "${1:-}" = vm ]; then
    printf '==== %s\n' "cargo build --release -p hangar-bench" >&2
    SQLX_OFFLINE=true cargo build --release -p hangar-bench
    echo "# Hangar benchmarks"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)'),"
    echo "$(qemu-system-x86_64 --version 2>/dev/null | head -n 1 || echo 'qemu-system-x86_64 not found'), load $(cut -d' ' -f1-3 /proc/loadavg)."
    exec "$bench_bin" "$@"
fi

if [ -z "${HANGAR_SERVICES_DIR:-}" ]; then
    printf '==== %s\n' "cargo build --release -p hangar -p hangar-bench" >&2
    SQLX_OFFLINE=true cargo build --release -p hangar -p hangar-bench
    # Runs this script again inside, with the services' URLs in the environment.
    exec bash ops/with-services.sh bash "${BASH_SOURCE[0]}" "$@"
fi

printf '==== %s\n' "hangar migrate" >&2
HANGAR_DATABASE_URL=$DATABASE_URL HANGAR_LOG=warn "$hangar_bin" migrate

echo "# Hangar benchmarks"
echo
echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (modified)'),"
echo "$(redis-server --version | cut -d' ' -f1-3), $(psql --version 2>/dev/null || echo postgres)."

if [ $# -gt 0 ]; then
    exec "$bench_bin" --hangar-bin "$hangar_bin" "$@"
fi
failed=()
for bench in pickup create throughput backlog dashboard apalis; do
    printf '==== hangar-bench %s\n' "$bench" >&2
    "$bench_bin" --hangar-bin "$hangar_bin" "$bench" || failed+=("$bench")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
