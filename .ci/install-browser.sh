#!/usr/bin/env bash
# The browser test's two dependencies (tests/test_chart_browser.py skips without them):
#   - Debian's chromium, at /usr/bin/chromium (apt, so it needs root or sudo);
#   - playwright-core, the pinned version in tests/browser/package-lock.json, into tests/browser/node_modules.
# Idempotent: each step runs only when its result is missing. playwright-core downloads no browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends chromium
fi

if [ ! -d tests/browser/node_modules/playwright-core ]; then
    # npm ci: exactly what package-lock.json pins, nothing resolved anew.
    (cd tests/browser && npm ci --no-audit --no-fund --ignore-scripts)
fi
