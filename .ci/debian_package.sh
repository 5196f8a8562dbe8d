#!/usr/bin/env bash
# Install a Debian package if its program is absent: `.ci/debian_package.sh PACKAGE PROGRAM`. scripts/test.sh
# installs chromium (/usr/bin/chromium, for tests/test_report_browser.py) and bubblewrap (bwrap, the sandbox of
# tests/test_eval_code.py and of LiveCodeBench grading). Non-interactive; idempotent.
set -euo pipefail
pkg="$1"
prog="$2"
if command -v "$prog" >/dev/null 2>&1; then
    echo "$pkg present: $("$prog" --version 2>/dev/null || echo unknown version)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || { echo "debian_package.sh: not root and no sudo; install $pkg by hand" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$pkg"
"$prog" --version
