#!/usr/bin/env bash
# Run the whole test suite: installs what it needs and starts the local services if they are down.
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
ensure_test_services
if [ -f .ci/install-helm.sh ]; then bash .ci/install-helm.sh; fi
# Prometheus and promtool for tests/test_prometheus.py and tests/test_alerts.py (its service is never started).
bash scripts/install-prometheus.sh
ruff check .
ruff format --check .
# llama.cpp's llama-server and a tiny model for tests/test_llamacpp.py: built once into ~/.cache/dispatcher
# (about 15 min on 2 cores), then reused; exports DISPATCHER_LLAMA_SERVER and DISPATCHER_LLAMA_MODEL.
llama_env="$(nice -n 19 bash scripts/build-llama-server.sh)"  # a failed build stops here (set -e)
eval "$llama_env"
# Tests spend most of their time waiting on real processes: a few run side by side (one test file
# per process, so a module's shared stack stays in one). DISPATCHER_TEST_PROCESSES=0 runs them serially.
processes="${DISPATCHER_TEST_PROCESSES:-3}"
if [ "$processes" -gt 0 ]; then
  set -- -n "$processes" --dist loadfile "$@"
fi
python -m pytest -q -p no:cacheprovider "$@"
