#!/usr/bin/env bash
# Clang's thread-safety analysis over every C++ file of the project (tests, tools and benchmarks
# included): a member read or written without the mutex its ABSL_GUARDED_BY names, or a function
# called without the lock its ABSL_EXCLUSIVE_LOCKS_REQUIRED asks for, is an error
# (-Werror=thread-safety, set in CMakeLists.txt for clang). Configures build-clang/ with clang 14
# (CUDA off: nvcc does not take clang as its host compiler here), generates the protobuf code,
# then checks with -fsyntax-only (the analysis needs no code generation) each file where it can
# find something: one that names a lock or its annotations, or includes a project header that does
# (an annotated class's inline code is analysed wherever the header is included). The other files
# call annotated classes only through methods that require no lock, which the analysis cannot fault.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
if ! dpkg-query -W -f='${Status}' clang-14 2>/dev/null | grep -q "install ok installed"; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "thread-safety: installing clang-14"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends clang-14
fi

CC=clang-14 CXX=clang++-14 cmake -S . -B build-clang -G Ninja -DCMAKE_BUILD_TYPE=Release -DLYCHEE_ENABLE_CUDA=OFF \
  -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
cmake --build build-clang -j"$(nproc)" --target lychee_proto

# Each project file's compile command, as the build would run it, with -fsyntax-only in place of
# writing an object; as many at once as there are cores.
python3 - "$PWD" "$(nproc)" <<'PYTHON'
import concurrent.futures, json, os, re, shlex, subprocess, sys
root, jobs = sys.argv[1], int(sys.argv[2])
locking = re.compile(r"absl::Mutex|MutexLock|ABSL_GUARDED_BY|ABSL_PT_GUARDED_BY|LOCKS_REQUIRED|LOCKS_EXCLUDED")
project_include = re.compile(r'#include "([^"]+\.h)"')

def text(path):
    with open(path, errors="replace") as file:
        return file.read()

def can_fault(path):
    source = text(path)
    if locking.search(source):
        return True
    headers = (os.path.join(root, header) for header in project_include.findall(source))
    return any(os.path.exists(header) and locking.search(text(header)) for header in headers)

commands = []
skipped = 0
for entry in json.load(open("build-clang/compile_commands.json")):
    path = entry["file"]
    if not path.startswith(root + "/") or path.startswith(root + "/build-clang/") or not path.endswith(".cc"):
        continue
    if not can_fault(path):
        skipped += 1
        continue
    words = shlex.split(entry["command"])
    if "-o" in words:
        at = words.index("-o")
        del words[at:at + 2]
    commands.append((path[len(root) + 1:], entry["directory"], [w for w in words if w != "-c"] + ["-fsyntax-only"]))
print(f"thread-safety: checking {len(commands)} files ({skipped} name no lock), {jobs} at a time", flush=True)

def check(command):
    name, directory, words = command
    result = subprocess.run(words, cwd=directory, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return name, result.returncode, result.stdout

failed = []
with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
    for name, code, output in pool.map(check, commands):
        if code != 0:
            failed.append(name)
            print(f"thread-safety: FAILED {name}\n{output}", flush=True)
if failed:
    print(f"thread-safety: {len(failed)} of {len(commands)} files fail: {' '.join(failed)}", file=sys.stderr)
    sys.exit(1)
print(f"thread-safety: all {len(commands)} files pass -Wthread-safety -Werror=thread-safety")
PYTHON
