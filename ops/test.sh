#!/usr/bin/env bash
# ops/test.sh [extra `cargo test` args]   THE test command (CI runs it through .ci/run).
#
# Installs missing system packages (ops/install-deps.sh, QEMU included), builds the guest image
# when missing or stale (ops/build-guest-image.sh, cached), starts a private Postgres and Redis
# (ops/with-services.sh, which stops them at the end whatever happens), then, failing fast:
# cargo fmt --check, clippy with warnings denied, the build of every binary, and the tests
# (two test threads unless the extra args say otherwise). Queries are checked at compile time
# against the committed .sqlx/ cache (SQLX_OFFLINE=true), not against the fresh database.
# The real-VM tests are required (HANGAR_REQUIRE_VM=1 unless set otherwise), and so are the
# real-Prometheus test (HANGAR_REQUIRE_PROMETHEUS=1) and the headless-Chromium dashboard test
# (HANGAR_REQUIRE_BROWSER=1; its npm packages are installed by `npm ci` first).
#   ops/test.sh                            everything
#   ops/test.sh -p hangar-jobs -- store    one crate, tests matching `store`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==== %s\n' "$*"; }

if [ -z "${HANGAR_SERVICES_DIR:-}" ]; then
    section "system packages (ops/install-deps.sh)"
    bash ops/install-deps.sh
    command -v cargo >/dev/null || { echo "cargo not found: install Rust with rustup (https://rustup.rs)" >&2; exit 1; }
    section "browser test packages (npm ci --prefix tests/browser)"
    npm ci --prefix tests/browser --no-audit --no-fund
    section "guest image (ops/build-guest-image.sh)"
    bash ops/build-guest-image.sh
    section "services (ops/with-services.sh)"
    # Runs this script again inside, with the services' URLs in the environment.
    exec bash ops/with-services.sh bash "${BASH_SOURCE[0]}" "$@"
fi

export SQLX_OFFLINE=true
# The VM tests (QEMU, under TCG where KVM is unusable) run for real: missing QEMU or image fails.
export HANGAR_REQUIRE_VM=${HANGAR_REQUIRE_VM:-1}
# The metrics test scrapes a cluster with the real Prometheus: a missing `prometheus` fails.
export HANGAR_REQUIRE_PROMETHEUS=${HANGAR_REQUIRE_PROMETHEUS:-1}
# The dashboard test drives Debian's headless Chromium: missing Chromium or npm packages fail.
export HANGAR_REQUIRE_BROWSER=${HANGAR_REQUIRE_BROWSER:-1}
export HANGAR_IMAGE_DIR=${HANGAR_IMAGE_DIR:-$PWD/.hangar/image}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
[ -d .sqlx ] || echo "warning: no .sqlx/ query cache; the build of query! macros will fail (cargo sqlx prepare --workspace)" >&2

# libtest rejects a repeated --test-threads, so 2 is added only when the args don't set it.
test_args=("$@")
case " $* " in
*" --test-threads"*) ;;
*" -- "*) test_args+=(--test-threads=2) ;;
*) test_args+=(-- --test-threads=2) ;;
esac

run() {
    section "$*"
    local start=$SECONDS
    "$@"
    echo "---- ok ($((SECONDS - start)) s): $*"
}
run cargo fmt --all --check
run cargo clippy --workspace --all-targets -- -D warnings
run cargo build --workspace --bins
run cargo test --workspace "${test_args[@]}"
section "all checks passed"
