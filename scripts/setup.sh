#!/usr/bin/env bash
# Installs the Debian bookworm packages the project builds with (scripts/debian-packages.txt) and
# those that CPU machines run with (scripts/debian-packages-cpu.txt).
# Idempotent: does nothing when every package is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t packages < <(cat scripts/debian-packages.txt scripts/debian-packages-cpu.txt | grep -v '^\s*\(#\|$\)')
# What installed packages provide counts as installed: e.g. NodeSource's nodejs provides npm, and
# conflicts with Debian's npm package.
declare -A provided
while read -r name; do provided[$name]=1; done < <(dpkg-query -W -f='${db:Status-Abbrev}|${Provides}\n' 2>/dev/null |
  awk -F'|' '$1 ~ /^ii/ { n = split($2, entries, /, */); for (i = 1; i <= n; i++) { split(entries[i], words, " "); if (words[1] != "") print words[1] } }')
missing=()
for package in "${packages[@]}"; do
  [ -n "${provided[$package]:-}" ] ||
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
