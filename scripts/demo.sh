#!/usr/bin/env bash
# Sets up, builds, and generates text from the bundled model: a passkey hidden in a held-out
# passage, which the model must retrieve. Extra arguments go to `lychee generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
build/tools/lychee/lychee generate --prompt-file scripts/demo-prompt.txt --max-new-tokens 48 "$@"
