#!/usr/bin/env bash
# The main job on the bundled default model, offline: installs what it needs, then runs `stepscope demo`.
set -euo pipefail
. "$(dirname "$0")/env.sh"
stepscope demo "$@"
