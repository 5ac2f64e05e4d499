#!/usr/bin/env bash
# Checks that the C++ and CUDA lines a change adds or edits are as .clang-format lays them out
# (clang-format --dry-run --Werror, Debian's clang-format 14). The change is everything from BASE
# to the working tree, committed or not; BASE is the argument, else where HEAD left `main` (the
# commits of a branch), else HEAD's parent (the last commit, on main itself):
#   scripts/format-check.sh [BASE]
# Only the touched lines are judged (clang-format --lines), not whole files: the code that was
# there before .clang-format came has hand-aligned tables and older wrapping that clang-format
# would redo, and a change should not have to reformat what it did not write. To lay out a
# change's lines: git clang-format BASE.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v clang-format >/dev/null || { echo "format-check: clang-format is not installed (scripts/setup.sh)" >&2; exit 1; }

base=${1:-}
if [ -z "$base" ]; then
  if git rev-parse -q --verify main >/dev/null && [ "$(git merge-base HEAD main)" != "$(git rev-parse HEAD)" ]; then
    base=$(git merge-base HEAD main)
  elif git rev-parse -q --verify HEAD^ >/dev/null; then
    base=HEAD^
  else
    echo "format-check: HEAD has no parent and is not on a branch from main; nothing to compare with" >&2
    exit 1
  fi
fi

failed=0
checked=0
# A moved file (git's rename detection, -M) is compared with its old self, so that only the lines
# the move edited count as touched, not the whole file.
while IFS=$'\t' read -r _ old new; do
  file=${new:-$old}
  # The added or edited lines of the file: the new side of each hunk, "+START,COUNT" (COUNT 0: a
  # hunk that only deletes).
  lines=()
  while IFS= read -r range; do
    start=${range%,*} count=1
    [[ $range == *,* ]] && count=${range#*,}
    [ "$count" -eq 0 ] || lines+=("--lines=$start:$((start + count - 1))")
  done < <(git diff -M -U0 "$base" -- "$old" "$file" | sed -nE 's/^@@ -[0-9,]+ \+([0-9,]+) @@.*/\1/p')
  [ ${#lines[@]} -gt 0 ] || continue
  checked=$((checked + 1))
  clang-format --dry-run --Werror "${lines[@]}" "$file" || failed=$((failed + 1))
done < <(git diff -M --name-status --diff-filter=AMR "$base" -- '*.cc' '*.h' '*.cu' '*.cuh')

if [ "$failed" -gt 0 ]; then
  echo "format-check: $failed of $checked changed files have lines that clang-format would lay out otherwise" \
    "(since $(git rev-parse --short "$base")); git clang-format $(git rev-parse --short "$base") fixes them" >&2
  exit 1
fi
echo "format-check: the changed lines of $checked files since $(git rev-parse --short "$base") are formatted"
