#!/usr/bin/env bash
# Sets up a fresh Debian bookworm machine, builds, and runs every test under ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
ctest --test-dir build --output-on-failure -j"$(nproc)"
