#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (Playwright drives it; no `playwright install`).
# Called by the `browser` fixture in tests/test_feedback_browser.py when no Chromium is found.
set -euo pipefail
CHROMIUM="${RLHFKIT_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ]; then
  echo "setup_browser.sh: $CHROMIUM not found and not running as root; install Debian's chromium" \
       "package (apt-get install chromium) or point RLHFKIT_CHROMIUM at a Chromium binary" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core >/dev/null
test -x "$CHROMIUM"
