#!/usr/bin/env bash
# Regenerates `.sqlx/`, the offline data of the compile-time checked queries, against a
# throw-away Postgres with the migrations applied. Run it after changing any query.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ops/with-services.sh bash -c '
  for f in migrations/*.sql; do psql -q "$DATABASE_URL" -v ON_ERROR_STOP=1 -f "$f"; done
  rm -rf .sqlx && mkdir .sqlx
  cargo clean -p hangar-jobs
  SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$PWD/.sqlx" cargo check -p hangar-jobs --all-targets
'
echo "==> $(ls .sqlx | wc -l) queries in .sqlx/"
