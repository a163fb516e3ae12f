#!/usr/bin/env bash
# The edge web page's runtime and its browser test:
#  - npm packages pinned in client/edge/web/package.json (transformers.js + onnxruntime-web),
#    copied into each export's web/vendor/ so the page loads nothing from a CDN or hub;
#  - Debian's chromium, which tests/test_edge_browser.py drives headless.
# onnxruntime-node (a transformers.js dependency, unused by the page) tries to download a
# CUDA provider after install: ONNXRUNTIME_NODE_INSTALL=skip stops that.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v npm >/dev/null; then
  echo "install_web.sh: npm not found; install Node.js 18+ (e.g. apt-get install nodejs npm)" >&2
  exit 1
fi
(cd client/edge/web && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund --loglevel=error)
if ! command -v chromium >/dev/null; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "web runtime installed (client/edge/web/node_modules); chromium: $(command -v chromium)"
