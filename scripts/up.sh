#!/usr/bin/env bash
# Run the whole stack locally: the vLLM simulator, the gateway and one worker (tokens in SQLite).
set -euo pipefail
DISPATCHER_EXTRAS="${DISPATCHER_EXTRAS:-test}"
# shellcheck source=scripts/setup.sh
. "$(dirname "$0")/setup.sh"
DISPATCHER_NEED_STREAMS=0 ensure_rabbitmq
exec dispatcher up "$@"
