#!/usr/bin/env bash
# Runs Hangar on this machine: installs what is missing, builds, and starts `hangar dev`
# (Postgres, Redis, API, worker, reconciler and a host agent in one process).
#   ops/dev.sh [hangar dev flags, e.g. --admin-key hk_dev_...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/install-deps.sh
cargo build --release -p hangar
# Real VMs need the guest image; `hangar dev` falls back to simulated VMs without it.
bash ops/build-guest-image.sh || echo "dev: no guest image; Hangar will run simulated VMs" >&2
exec target/release/hangar dev "$@"
