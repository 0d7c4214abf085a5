#!/usr/bin/env bash
# Shared set-up for scripts/up.sh and scripts/test.sh: a virtualenv with the project installed,
# and the local services (RabbitMQ with its stream plugin, Redis, PostgreSQL, MariaDB) running.
# Sourced, not run: it activates the virtualenv in the caller's shell.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Extras to install beside the runtime: scripts/test.sh wants "test" (the default); scripts/up.sh sets
# it empty, the runtime only (no pytest, schemathesis, hadolint, matplotlib to run the stack).
EXTRAS="${DISPATCHER_EXTRAS-test}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
version="$(sha1sum pyproject.toml | cut -c1-12)"
stamp=".venv/.installed-$version-${EXTRAS:-runtime}"
installed() {
  [ -f "$stamp" ] && return 0
  # The runtime is in every install of this pyproject.toml, whatever its extras.
  [ -z "$EXTRAS" ] && compgen -G ".venv/.installed-$version-*" >/dev/null
}
if ! installed; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".${EXTRAS:+[$EXTRAS]}"
  touch "$stamp"
fi

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" && return 0; sleep 1; done
  echo "service on port $1 did not come up" >&2
  return 1
}

ensure_rabbitmq() {
  if ! port_open 5672; then
    echo "starting RabbitMQ..."
    rabbitmq-server -detached
    wait_port 5672
  fi
  if [ "${DISPATCHER_NEED_STREAMS:-1}" = 1 ] && ! port_open 5552; then
    rabbitmq-plugins enable rabbitmq_stream >/dev/null
    wait_port 5552
  fi
}

ensure_test_services() {
  ensure_rabbitmq
  if ! port_open 6379; then
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_port 6379
  fi
  if ! port_open 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    wait_port 5432
  fi
  if ! port_open 3306; then
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd
    wait_port 3306
  fi
}
