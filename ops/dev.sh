#!/usr/bin/env bash
# Runs Hangar on this machine: installs what is missing, builds, and starts `hangar dev`
# (Postgres, Redis, API, worker, reconciler and a host agent in one process).
#   ops/dev.sh [hangar dev flags, e.g. --admin-key hk_dev_...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install-deps.sh
cargo build --release -p hangar
exec target/release/hangar dev "$@"
