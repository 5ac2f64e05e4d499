#!/usr/bin/env bash
# Sets up and builds, then runs the service pair on the bundled model (scripts/serve-demo.sh): a
# passkey hidden in a held-out passage, streamed back through the inference service with dense and
# hybrid attention, and a partition rollout and rollback while it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
scripts/serve-demo.sh build cpu
