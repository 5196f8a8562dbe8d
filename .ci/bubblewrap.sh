#!/usr/bin/env bash
# Install Debian's bubblewrap (the sandbox of tests/test_eval_code.py and of LiveCodeBench grading) if it is
# absent. Non-interactive; idempotent.
set -euo pipefail
if command -v bwrap >/dev/null 2>&1; then
    echo "bubblewrap present: $(bwrap --version 2>/dev/null || echo unknown version)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo >/dev/null 2>&1 || { echo "bubblewrap.sh: not root and no sudo; install bubblewrap by hand" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends bubblewrap
bwrap --version
