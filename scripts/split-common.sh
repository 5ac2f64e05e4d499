#!/usr/bin/env bash
# Splits common/ into one folder per link cost (issue 16, item 5), so that a folder says what
# linking its libraries brings in:
#   common/base/     lychee_common: checkpoints, config, tokenizer, chat templates, head partitions,
#                    corpora, durable files. No LibTorch.
#   common/model/    lychee_model: the LibTorch decoder, KV pool, sampling, tensor parallelism, and
#                    its fused CUDA kernels (cuda/).
#   common/eval/     lychee_eval, lychee_validation: the evaluation harness over the model and the
#                    attention kernels.
#   common/service/  lychee_security, lychee_metrics, lychee_server_logging, lychee_flags,
#                    lychee_resource_paths: what the servers and the CLI share. No LibTorch.
# Run from the repository root of a checkout:  scripts/split-common.sh
# It `git mv`s each file the table below names, rewrites every path to it in the tracked text files
# (includes, CMake, scripts, READMEs) with substitutions built from the same table, lays out the
# rewritten C++ lines with clang-format, and writes the CMakeLists.txt of each folder. Running it
# again on a split tree changes nothing. It stops before
# touching anything when common/ holds a file the table does not name, or when
# common/CMakeLists.txt is not the one the CMake below was written from: add the file to the table
# and to its folder's CMake, or carry the change into the CMake below, then run it again.
set -euo pipefail
cd "$(dirname "$0")/.."

# file or folder of common/ -> the folder it moves to
read -r -d '' MAPPING <<'TABLE' || true
accuracy_plot.cc                base
accuracy_plot.h                 base
chat_template.cc                base
chat_template.h                 base
durable_file.cc                 base
durable_file.h                  base
head_partition.cc               base
head_partition.h                base
heap_tuning.cc                  base
heap_tuning.h                   base
json_parse.h                    base
model_config.cc                 base
model_config.h                  base
model_fingerprint.cc            base
model_fingerprint.h             base
partition_store.cc              base
partition_store.h               base
random_partition.cc             base
random_partition.h              base
retrieval_tasks.cc              base
retrieval_tasks.h               base
safetensors.cc                  base
safetensors.h                   base
status_macros.h                 base
tokenizer.cc                    base
tokenizer.h                     base
tokenizer_unicode_tables.h      base
utf8.cc                         base
utf8.h                          base
attention.cc                    model
attention.h                     model
cuda                            model
cuda_support.cc                 model
cuda_support.h                  model
cuda_support_none.cc            model
gloo_group.cc                   model
gloo_group_none.cc              model
rank_workers.cc                 model
rank_workers.h                  model
kv_pool.cc                      model
kv_pool.h                       model
model.cc                        model
model.h                         model
sampling.cc                     model
sampling.h                      model
tensor_parallel.cc              model
tensor_parallel.h               model
torch_errors.cc                 model
torch_errors.h                  model
evaluation.cc                   eval
evaluation.h                    eval
partition_validation.cc         eval
partition_validation.h          eval
command_line.cc                 service
command_line.h                  service
grpc_server.h                   service
grpc_status.cc                  service
grpc_status.h                   service
metrics.cc                      service
metrics.h                       service
resource_paths.cc               service
resource_paths.h                service
security.cc                     service
security.h                      service
server_logging.cc               service
server_logging.h                service
service_main.h                  service
shutdown_signals.h              service
TABLE
FOLDERS="base model eval service"
# sha256 of the common/CMakeLists.txt that the CMake written below replaces.
UNSPLIT_CMAKE_SHA256=7f202a2ed4fa6cbe6f3903f72e15da974f3bec71caf398e9bb30b9bc0142b0ce

fail() {
  echo "split-common: $*" >&2
  exit 1
}

command -v clang-format >/dev/null || fail "clang-format is not installed (scripts/setup.sh)"

declare -A destination
while read -r name folder; do destination[$name]=$folder; done <<<"$MAPPING"

# Everything is checked before anything moves, so that a refusal leaves the tree as it was.
unnamed=()
for path in common/*; do
  name=${path#common/}
  [[ $name == CMakeLists.txt || " $FOLDERS " == *" $name "* || -n ${destination[$name]:-} ]] || unnamed+=("$path")
done
[ ${#unnamed[@]} -eq 0 ] ||
  fail "no folder for ${unnamed[*]}: add each to the table in $0 and to its folder's CMakeLists.txt there"
if [ ! -d common/base ]; then
  sha=$(sha256sum common/CMakeLists.txt | cut -d' ' -f1)
  [ "$sha" = "$UNSPLIT_CMAKE_SHA256" ] ||
    fail "common/CMakeLists.txt changed since $0 was written (sha256 $sha): carry the change into the" \
      "CMakeLists.txt files the script writes, then set UNSPLIT_CMAKE_SHA256 to $sha"
fi

for folder in $FOLDERS; do mkdir -p "common/$folder"; done
for name in "${!destination[@]}"; do
  if [ -e "common/$name" ]; then
    git mv "common/$name" "common/${destination[$name]}/$name"
  elif [ ! -e "common/${destination[$name]}/$name" ]; then
    echo "split-common: common/$name is in neither place (removed since the table was written?)" >&2
  fi
done

# One substitution per moved path: common/NAME -> common/FOLDER/NAME, where NAME is the whole file
# name (common/model.h, not common/model_config.h) and the path is not the tail of another one
# (tests/common/...). Only the files that still name an old path are rewritten, and a rewritten
# path never matches again: a second run touches no file.
substitutions=""
for name in "${!destination[@]}"; do
  substitutions+="s#(?<![\\w/])common/\\Q$name\\E(?!\\w)#common/${destination[$name]}/$name#g;"
done
old_paths="(?<![\\w/])common/($(printf '%s\n' "${!destination[@]}" | sed 's/\./\\./g' | paste -sd'|'))(?!\\w)"
mapfile -d '' stale < <(git ls-files -z | grep -zv '^scripts/split-common\.sh$' | xargs -0r grep -lIZP "$old_paths")
echo "split-common: rewriting the paths in ${#stale[@]} files"
# The lines to rewrite, as clang-format's --lines, for the C++ files (a substitution keeps the lines
# where they are).
declare -A rewritten_lines
for file in "${stale[@]}"; do
  [[ $file =~ \.(cc|h|cu|cuh)$ ]] || continue
  rewritten_lines[$file]=$(grep -nP "$old_paths" "$file" | sed -E 's/^([0-9]+):.*/--lines=\1:\1/' | paste -sd' ')
done
[ ${#stale[@]} -eq 0 ] || perl -pi -e "$substitutions" "${stale[@]}"

# Rewritten lines lay out otherwise: includes sort differently (common/base/ before common/model/),
# a comment may grow past the column limit. clang-format lays out those lines and no other.
for file in "${!rewritten_lines[@]}"; do
  # shellcheck disable=SC2086 # one --lines=N:N word per rewritten line
  clang-format -i ${rewritten_lines[$file]} "$file"
done

# Each folder's CMake, written only where it differs (so that a second run leaves every file as it was).
write() {
  local content
  content=$(cat)
  [ -f "$1" ] && [ "$(cat "$1")" = "$content" ] || printf '%s\n' "$content" >"$1"
}

write common/CMakeLists.txt <<'CMAKE'
# common/ by what linking costs (scripts/split-common.sh made the folders): base/ and service/ are
# free of LibTorch; model/ is LibTorch (and CUDA where nvcc is); eval/ is the model and the attention
# kernels.
add_subdirectory(base)
add_subdirectory(service)
add_subdirectory(model)
# The tests build tensor_parallel_test only where LibTorch has Gloo (model/CMakeLists.txt finds out).
set(LYCHEE_HAVE_GLOO ${LYCHEE_HAVE_GLOO} PARENT_SCOPE)
add_subdirectory(eval)
CMAKE

write common/base/CMakeLists.txt <<'CMAKE'
# lychee_common: checkpoint, config, tokenizer, chat templates, head partitions, retrieval corpora and
# durable files; free of LibTorch so that the gRPC layers and the tools can use them cheaply. Linking
# it costs the generated protobuf and gRPC code (lychee_proto), Abseil, glog, PCRE2, utf8proc, zlib
# and OpenSSL's libcrypto.
add_library(lychee_common STATIC
  safetensors.cc
  model_config.cc
  tokenizer.cc
  utf8.cc
  head_partition.cc
  random_partition.cc
  heap_tuning.cc
  retrieval_tasks.cc
  durable_file.cc
  model_fingerprint.cc
  partition_store.cc
  chat_template.cc
  accuracy_plot.cc
)
target_include_directories(lychee_common PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_common
  PUBLIC lychee_proto absl::status absl::statusor absl::strings absl::span absl::synchronization absl::time
  PRIVATE nlohmann_json::nlohmann_json PkgConfig::GLOG PkgConfig::PCRE2 PkgConfig::UTF8PROC ZLIB::ZLIB OpenSSL::Crypto)
CMAKE

write common/service/CMakeLists.txt <<'CMAKE'
# What the servers and the CLI share around their gRPC and HTTP endpoints. All free of LibTorch.

# lychee_security: TLS credentials from PEM files, bearer-token access control, and absl::Status
# to and from gRPC status codes; shared by both servers and the CLI.
add_library(lychee_security STATIC security.cc grpc_status.cc)
target_include_directories(lychee_security PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_security PUBLIC gRPC::grpc++ absl::status absl::statusor absl::strings
                                      PRIVATE OpenSSL::Crypto)

# lychee_metrics: the Prometheus registry and its /metrics endpoint (libmicrohttpd), which both
# servers export through.
add_library(lychee_metrics STATIC metrics.cc)
target_include_directories(lychee_metrics PUBLIC ${CMAKE_SOURCE_DIR})
target_include_directories(lychee_metrics PRIVATE ${MICROHTTPD_INCLUDE_DIR})
target_link_libraries(lychee_metrics PUBLIC absl::statusor absl::strings absl::synchronization PRIVATE ${MICROHTTPD_LIBRARY})

# lychee_server_logging: glog set up for the servers, and their one line per request (--log-requests).
add_library(lychee_server_logging STATIC server_logging.cc)
target_include_directories(lychee_server_logging PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_server_logging PUBLIC gRPC::grpc++ PRIVATE absl::status absl::strings PkgConfig::GLOG)

# lychee_flags: Abseil flags parsed under dashed names, for the servers and the benchmarks (the CLI's
# subcommands have their own parser, tools/lychee/args.h).
add_library(lychee_flags STATIC command_line.cc)
target_include_directories(lychee_flags PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_flags PUBLIC absl::flags absl::flags_parse absl::flags_usage absl::flags_reflection
                                          absl::status absl::statusor absl::strings)

# lychee_resource_paths: where a binary finds the bundled model and corpora (resource_paths.h),
# installed or in its build tree.
add_library(lychee_resource_paths STATIC resource_paths.cc)
target_include_directories(lychee_resource_paths PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_resource_paths PUBLIC absl::status absl::statusor absl::strings)
file(RELATIVE_PATH LYCHEE_SHARE_FROM_BIN /root/${CMAKE_INSTALL_BINDIR} /root/${LYCHEE_INSTALL_SHARE_DIR})
target_compile_definitions(lychee_resource_paths PRIVATE LYCHEE_SHARE_FROM_BIN="${LYCHEE_SHARE_FROM_BIN}"
                                                         LYCHEE_BUILD_SOURCE_DIR="${CMAKE_SOURCE_DIR}")
CMAKE

write common/model/CMakeLists.txt <<'CMAKE'
# lychee_model: the decoder forward in LibTorch, its paged KV pool, CUDA graphs of the decode step,
# sampling, and tensor parallelism over c10d Gloo. Linking it costs LibTorch (with CUDA and the fused
# kernels of cuda/ where the LibTorch has CUDA) on top of lychee_common.
add_library(lychee_model STATIC
  attention.cc
  kv_pool.cc
  model.cc
  sampling.cc
  torch_errors.cc
  tensor_parallel.cc
  rank_workers.cc
)
# CUDA graphs of the decode step and its fused kernels (cuda/) need a CUDA LibTorch.
if(LYCHEE_TORCH_CUDA)
  target_sources(lychee_model PRIVATE cuda_support.cc)
  target_link_libraries(lychee_model PUBLIC lychee_model_kernels_torch)
  target_compile_definitions(lychee_model PRIVATE LYCHEE_FUSED_DECODE)
else()
  target_sources(lychee_model PRIVATE cuda_support_none.cc)
endif()
# Tensor parallelism's process group: c10d's Gloo where this LibTorch ships its headers and gloo's
# (Debian: libgloo-dev); without them JoinGlooGroup is UNIMPLEMENTED and the rest still builds.
# Both only beside this LibTorch's own headers: gloo's must be the version it was built with (pip's
# LibTorch links its own copy), never another one a prefix happens to hold.
find_path(LYCHEE_C10D_GLOO_INCLUDE torch/csrc/distributed/c10d/ProcessGroupGloo.hpp PATHS ${TORCH_INCLUDE_DIRS}
          NO_DEFAULT_PATH)
find_path(LYCHEE_GLOO_INCLUDE gloo/context.h PATHS ${TORCH_INCLUDE_DIRS} NO_DEFAULT_PATH)
if(LYCHEE_C10D_GLOO_INCLUDE AND LYCHEE_GLOO_INCLUDE)
  set(LYCHEE_HAVE_GLOO ON PARENT_SCOPE)
  target_sources(lychee_model PRIVATE gloo_group.cc)
  set_source_files_properties(gloo_group.cc PROPERTIES COMPILE_DEFINITIONS USE_C10D_GLOO)
  target_include_directories(lychee_model PRIVATE ${LYCHEE_GLOO_INCLUDE})
else()
  set(LYCHEE_HAVE_GLOO OFF PARENT_SCOPE)
  target_sources(lychee_model PRIVATE gloo_group_none.cc)
endif()
message(STATUS "lychee: Gloo process groups ${LYCHEE_C10D_GLOO_INCLUDE} ${LYCHEE_GLOO_INCLUDE}")
target_include_directories(lychee_model PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_model PUBLIC lychee_common absl::synchronization ${TORCH_LIBRARIES})
target_compile_options(lychee_model PUBLIC ${TORCH_CXX_FLAGS})

if(LYCHEE_HAVE_CUDA)
  add_subdirectory(cuda)
endif()
CMAKE

write common/eval/CMakeLists.txt <<'CMAKE'
# lychee_eval: the evaluation harness (retrieval tasks against attention backends, tables, JSON, SVG
# plots). Linking it costs lychee_model, hence LibTorch.
add_library(lychee_eval STATIC evaluation.cc)
target_include_directories(lychee_eval PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_eval PUBLIC lychee_model PRIVATE nlohmann_json::nlohmann_json)

# lychee_validation: a head partition against dense on retrieval prompts (partition_validation.h);
# costs the attention kernels (lychee_kernels) on top of lychee_eval.
add_library(lychee_validation STATIC partition_validation.cc)
target_include_directories(lychee_validation PUBLIC ${CMAKE_SOURCE_DIR})
target_link_libraries(lychee_validation PUBLIC lychee_eval lychee_kernels PRIVATE nlohmann_json::nlohmann_json)
CMAKE

echo "split-common: common/ is in $FOLDERS; review with git status, build, and commit"
