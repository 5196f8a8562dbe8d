#!/usr/bin/env bash
# The test suite: installs what it needs (test extras, Debian's chromium for the browser test, bubblewrap for the
# code sandbox), lints, tests.
set -euo pipefail
STEPSCOPE_EXTRAS=test . "$(dirname "$0")/env.sh"
if [ ! -x /usr/bin/chromium ] && [ -f .ci/chromium.sh ]; then
    bash .ci/chromium.sh || echo "warning: chromium could not be installed; the browser test will say so"
fi
if ! command -v bwrap >/dev/null 2>&1 && [ -f .ci/bubblewrap.sh ]; then
    bash .ci/bubblewrap.sh || echo "warning: bubblewrap could not be installed; the sandbox tests will say so"
fi
ruff check src tests bench
python -m pytest "$@"
