#!/usr/bin/env bash
# Run the whole test suite: installs what it needs and starts the local services if they are down.
set -euo pipefail
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
ensure_test_services
if [ -f .ci/install-helm.sh ]; then bash .ci/install-helm.sh; fi
ruff check .
python -m pytest -q -p no:cacheprovider "$@"
