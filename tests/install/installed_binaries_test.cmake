# Installs BUILD_DIR to PREFIX and checks that the installed binaries find the bundled model and
# corpora under PREFIX/share/lychee from any working directory, and name what they looked for when
# LYCHEE_SHARE_DIR points at a directory without them.
file(REMOVE_RECURSE ${PREFIX})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${PREFIX}
                RESULT_VARIABLE result OUTPUT_QUIET ERROR_VARIABLE error)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${result}): ${error}")
endif()
# The executable's path as /proc/self/exe gives it: symbolic links resolved.
file(REAL_PATH ${PREFIX} PREFIX)
set(share ${PREFIX}/share/lychee)
set(elsewhere ${PREFIX}/elsewhere)
file(MAKE_DIRECTORY ${elsewhere})
unset(ENV{LYCHEE_SHARE_DIR})

function(run_installed expected_result)
  execute_process(COMMAND ${ARGN} WORKING_DIRECTORY ${elsewhere} RESULT_VARIABLE result OUTPUT_VARIABLE output
                  ERROR_VARIABLE error)
  if(NOT result EQUAL expected_result)
    message(FATAL_ERROR "${ARGN}: exit ${result}, expected ${expected_result}\n${output}\n${error}")
  endif()
  set(output "${output}${error}" PARENT_SCOPE)
endfunction()

function(expect_in text expected what)
  string(FIND "${text}" "${expected}" at)
  if(at EQUAL -1)
    message(FATAL_ERROR "${what} does not name ${expected}:\n${text}")
  endif()
endfunction()

run_installed(0 ${PREFIX}/bin/lychee generate --prompt hi --max-new-tokens 4 --print-ids)
string(REGEX MATCHALL "[0-9]+" ids "${output}")
if(NOT ids)
  message(FATAL_ERROR "the installed lychee generate printed no token ids:\n${output}")
endif()

run_installed(0 ${PREFIX}/bin/lychee-inference --help)
expect_in("${output}" "${share}/models/tiny-llama-retrieval" "lychee-inference --help")
expect_in("${output}" "${share}/data/corpus/kjv-heldout.txt.gz" "lychee-inference --help")
run_installed(0 ${PREFIX}/bin/lychee-trainer --help)
expect_in("${output}" "${share}/models" "lychee-trainer --help")
expect_in("${output}" "${share}/data" "lychee-trainer --help")

set(ENV{LYCHEE_SHARE_DIR} ${elsewhere})
run_installed(1 ${PREFIX}/bin/lychee generate --prompt hi --max-new-tokens 4)
expect_in("${output}" "LYCHEE_SHARE_DIR=${elsewhere}" "lychee generate with an empty LYCHEE_SHARE_DIR")
