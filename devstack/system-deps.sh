#!/usr/bin/env bash
# Install the OS packages the project needs, if missing: a PostgreSQL server (with
# wal_level=logical support, i.e. any supported version), redis-server, the wal2json
# output plugin for that PostgreSQL, and python3-venv. Debian/Ubuntu only (apt-get).
# Runs apt-get through sudo when not root. Does nothing when everything is present.
set -euo pipefail

need=()
optional=()
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bin)" ] || [ ! -x "$(pg_bin)/initdb" ]; then
  need+=(postgresql)
fi
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# promtool (from Debian's prometheus package) checks docker/prometheus/alerts.yml in the tests.
command -v promtool >/dev/null 2>&1 || optional+=(prometheus)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
# openssl makes the test CA and certificates of the Redis TLS tests.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
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

# Optional packages: their tests are skipped when they cannot be installed.
if [ "${#optional[@]}" -gt 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${optional[*]} (optional)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${optional[@]}" >/dev/null || echo "system-deps: could not install ${optional[*]}; skipping" >&2
fi

# The Debian packages may start a cluster, a redis-server or a prometheus of their own:
# nothing here uses them (tests and make run start private servers).
exit 0
