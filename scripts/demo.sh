#!/usr/bin/env bash
# The main job on the bundled default model, offline: installs what it needs, then runs `stepscope demo`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
if stepscope demo --help >/dev/null 2>&1; then
    stepscope demo "$@"
else  # until the demo lands: the bundled example trace with the default model's tokenizer
    stepscope trace "$(python -c 'import stepscope.data as d; print(d.example_path())')" "$@"
fi
