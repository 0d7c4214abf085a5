#!/usr/bin/env bash
# Run the whole stack locally: the vLLM simulator, the gateway and one worker (tokens in SQLite,
# in $XDG_DATA_HOME/dispatcher/).
set -euo pipefail
# The runtime only (scripts/test.sh adds the test tools); DISPATCHER_EXTRAS=loadtest for `dispatcher bench`.
DISPATCHER_EXTRAS="${DISPATCHER_EXTRAS-}"
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
ensure_rabbitmq  # with its stream plugin: `dispatcher usage` reads the usage ledger of `up`
exec dispatcher up "$@"
