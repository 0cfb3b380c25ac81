#!/usr/bin/env bash
# Install the OS packages the project needs, if missing: a PostgreSQL server (with
# wal_level=logical support, i.e. any supported version), redis-server, the wal2json
# output plugin for that PostgreSQL, and python3-venv. Debian/Ubuntu only (apt-get).
# Runs apt-get through sudo when not root. Does nothing when everything is present.
set -euo pipefail

need=()
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  need+=(postgresql)
fi
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "system-deps: need root (or sudo) to install: ${need[*]}" >&2; exit 1; fi
}

if [ "${#need[@]}" -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "system-deps: missing ${need[*]} and no apt-get here; install them by hand" >&2
    exit 1
  fi
  echo "system-deps: installing ${need[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# wal2json for the PostgreSQL version we run (optional: its tests skip without it).
bin="$(pg_bin)"
version="$(basename "$(dirname "$bin")")"
if [ ! -e "/usr/lib/postgresql/${version}/lib/wal2json.so" ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing postgresql-${version}-wal2json"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "postgresql-${version}-wal2json" >/dev/null \
    || echo "system-deps: wal2json not available; its tests will be skipped" >&2
fi

# The Debian package starts a cluster and a redis-server of its own: we never use them.
exit 0
