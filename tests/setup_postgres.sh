#!/usr/bin/env bash
# Start a local PostgreSQL (Debian's package) with an empty rlhfkit_test database, for the store's
# PostgreSQL test. Prints the URL to use as RLHFKIT_TEST_PG_URL. Loopback only.
set -euo pipefail
# Everything but the URL goes to stderr: pg_ctlcluster prints notes such as "Removed stale pid file."
exec 3>&1 1>&2
export DEBIAN_FRONTEND=noninteractive
if ! command -v pg_lsclusters >/dev/null 2>&1 || [ -z "$(pg_lsclusters -h 2>/dev/null)" ]; then
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends postgresql >/dev/null
fi
read -r ver cluster _ < <(pg_lsclusters -h | head -n1)
pg_ctlcluster "$ver" "$cluster" start 2>/dev/null 3>&- || true   # the server must not hold our stdout
for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && break; sleep 1; done
su postgres -c "psql -q -c \"ALTER USER postgres PASSWORD 'rlhfkit'\"" >/dev/null
su postgres -c "psql -q -c 'DROP DATABASE IF EXISTS rlhfkit_test'" >/dev/null
su postgres -c "psql -q -c 'CREATE DATABASE rlhfkit_test'" >/dev/null
echo "postgresql+psycopg://postgres:rlhfkit@127.0.0.1:5432/rlhfkit_test" >&3
