#!/usr/bin/env bash
# Debian's prometheus package (prometheus and promtool) for tests/test_prometheus.py and the alert
# rule tests. Idempotent: does nothing when both binaries are there. The package would start a system
# Prometheus on :9090 (the worker's default port): a policy-rc.d denies service starts during the
# install, and any instance left running is stopped and disabled; tests start their own on free ports.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  own_policy=1
fi
trap 'if [ "$own_policy" = 1 ]; then $SUDO rm -f "$policy"; fi' EXIT
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# Belt and braces: whatever init system is there, the packaged service stays off.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ]; then
  $SUDO /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  $SUDO update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
command -v prometheus >/dev/null && command -v promtool >/dev/null
