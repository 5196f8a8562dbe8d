#!/usr/bin/env bash
# The test suite: installs what it needs (test extras, Debian's chromium for the browser test), lints, tests.
set -euo pipefail
STEPSCOPE_EXTRAS=test . "$(dirname "$0")/env.sh"
if [ ! -x /usr/bin/chromium ] && [ -f .ci/chromium.sh ]; then
    bash .ci/chromium.sh || echo "warning: chromium could not be installed; the browser test will say so"
fi
ruff check src tests bench
python -m pytest "$@"
