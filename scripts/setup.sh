#!/usr/bin/env bash
# Installs the Debian bookworm packages the project builds with (scripts/debian-packages.txt) and
# those that CPU machines run with (scripts/debian-packages-cpu.txt).
# Idempotent: does nothing when every package is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t packages < <(cat scripts/debian-packages.txt scripts/debian-packages-cpu.txt | grep -v '^\s*\(#\|$\)')
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#packages[@]} packages are installed"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "setup: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
