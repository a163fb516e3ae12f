#!/usr/bin/env bash
# Debian's prometheus (the server and promtool): tests/test_prometheus_rules.py checks the
# alerting rules in deploy/prometheus/ with promtool, and tests/test_swarm_api.py has a real
# Prometheus scrape the API and a block server. Skipped when both tools are already on PATH.
set -euo pipefail
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
echo "monitoring tools installed: $(command -v prometheus), $(command -v promtool)"
