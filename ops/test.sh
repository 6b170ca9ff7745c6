#!/usr/bin/env bash
# The test command: installs what is missing, starts a private Postgres and Redis, and runs
# the formatting and lint checks and every test against them.
#   ops/test.sh [extra arguments for `cargo test`]
set -euo pipefail
cd "$(dirname "$0")/.."

bash ops/install-deps.sh

# The compile-time checked queries build from the committed `.sqlx/` data.
export SQLX_OFFLINE=true
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

echo "==> cargo fmt --check"
cargo fmt --all --check
echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "==> cargo build"
cargo build --workspace --bins

echo "==> cargo test"
bash ops/with-services.sh cargo test --workspace -- --test-threads=2 "$@"
