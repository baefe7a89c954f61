# Drives one packaging test: builds a tiny consumer project against gqa the way a user would.
#
#   cmake -DMODE=find_package|add_subdirectory -DGQA_SOURCE_DIR=<gqa source> -DWORK_DIR=<scratch dir>
#         -DCXX_COMPILER=<c++> [-DGENERATOR=<gen>] [-DMAKE_PROGRAM=<make>] [-DBUILD_TYPE=<type>]
#         -P run_consumer.cmake
#
# find_package:     configures gqa into WORK_DIR/gqa-build with tests, benchmarks, examples and the gqa-convert tool
#                   OFF (the headers and the CMake package are under test; the tool is a 40 s compile), installs it
#                   into WORK_DIR/prefix, then configures, builds and runs tests/packaging/find_package against
#                   that prefix (app: gqa::gqa, app_checkpoint: gqa::checkpoint). Also checks that the version
#                   file rejects an incompatible request (0.2).
# add_subdirectory: configures, builds and runs tests/packaging/add_subdirectory, which vendors gqa's source
#                   tree (with GQA_NATIVE=ON, to prove the flag stays inside gqa), then checks the consumer's
#                   compile command for leaked flags.
# Any failing step ends the script with FATAL_ERROR, which makes `cmake -P` exit non-zero.
cmake_minimum_required(VERSION 3.16)

foreach(var MODE GQA_SOURCE_DIR WORK_DIR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "run_consumer.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT DEFINED BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()

set(generator_args)
if(GENERATOR)
  list(APPEND generator_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND generator_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
set(common_args ${generator_args} "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")

# run_step(<what> <command...>): runs the command, echoes its output, stops on a non-zero exit.
function(run_step what)
  message(STATUS "[${MODE}] ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  message("${out}")
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGN}")
    message(FATAL_ERROR "[${MODE}] ${what} failed (${rc}): ${cmd}")
  endif()
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")
set(consumer_src "${GQA_SOURCE_DIR}/tests/packaging/${MODE}")
set(consumer_build "${WORK_DIR}/consumer-build")

if(MODE STREQUAL "find_package")
  set(prefix "${WORK_DIR}/prefix")
  run_step("configure gqa" "${CMAKE_COMMAND}" -S "${GQA_SOURCE_DIR}" -B "${WORK_DIR}/gqa-build" ${common_args}
           "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}" -DGQA_BUILD_TESTS=OFF -DGQA_BUILD_BENCHMARKS=OFF
           -DGQA_BUILD_EXAMPLES=OFF -DGQA_BUILD_TOOLS=OFF "-DCMAKE_INSTALL_PREFIX=${prefix}")
  run_step("build gqa" "${CMAKE_COMMAND}" --build "${WORK_DIR}/gqa-build")
  run_step("install gqa" "${CMAKE_COMMAND}" --install "${WORK_DIR}/gqa-build")

  file(GLOB_RECURSE config_files "${prefix}/*/gqaConfig.cmake")
  file(GLOB_RECURSE version_files "${prefix}/*/gqaConfigVersion.cmake")
  file(GLOB_RECURSE target_files "${prefix}/*/gqaTargets.cmake")
  file(GLOB_RECURSE checkpoint_target_files "${prefix}/*/gqaCheckpointTargets.cmake")
  if(NOT EXISTS "${prefix}/include/gqa/gqa.hpp" OR NOT EXISTS "${prefix}/include/gqa/version.hpp" OR
     NOT config_files OR NOT version_files OR NOT target_files OR NOT checkpoint_target_files)
    file(GLOB_RECURSE installed RELATIVE "${prefix}" "${prefix}/*")
    message(FATAL_ERROR "[find_package] incomplete install in ${prefix}: ${installed}")
  endif()

  run_step("configure consumer" "${CMAKE_COMMAND}" -S "${consumer_src}" -B "${consumer_build}" ${common_args}
           "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}" "-DCMAKE_PREFIX_PATH=${prefix}" "-DGQA_TEST_PREFIX=${prefix}")
  run_step("build consumer" "${CMAKE_COMMAND}" --build "${consumer_build}")
  run_step("run consumer" "${consumer_build}/app")
  run_step("run checkpoint consumer" "${consumer_build}/app_checkpoint" "${WORK_DIR}")

  # gqaConfigVersion.cmake (SameMinorVersion) must refuse a request for a different minor version.
  message(STATUS "[find_package] configure consumer asking for gqa 0.2 (must fail)")
  execute_process(COMMAND "${CMAKE_COMMAND}" -S "${consumer_src}" -B "${WORK_DIR}/consumer-0.2" ${common_args}
                          "-DCMAKE_PREFIX_PATH=${prefix}" -DGQA_REQUIRE_VERSION=0.2
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  string(REGEX REPLACE "[ \t\r\n]+" " " flat "${out}")  # CMake wraps its error messages
  if(rc EQUAL 0 OR NOT flat MATCHES "package \"gqa\" that is compatible with requested version \"0\\.2\"")
    message("${out}")
    message(FATAL_ERROR "[find_package] find_package(gqa 0.2) did not fail with a version mismatch (exit ${rc})")
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  # Empty build type on purpose: gqa must not force its top-level default (Release) onto a parent project.
  run_step("configure consumer" "${CMAKE_COMMAND}" -S "${consumer_src}" -B "${consumer_build}" ${common_args}
           -DCMAKE_BUILD_TYPE= "-DGQA_SOURCE_DIR=${GQA_SOURCE_DIR}" -DGQA_NATIVE=ON
           -DCMAKE_EXPORT_COMPILE_COMMANDS=ON)
  run_step("build consumer" "${CMAKE_COMMAND}" --build "${consumer_build}")
  run_step("run consumer" "${consumer_build}/app")
  run_step("run checkpoint consumer" "${consumer_build}/app_checkpoint" "${WORK_DIR}")

  # As a subproject gqa compiles nothing, so the only compile commands are the consumer's. They must carry gqa's
  # usage requirements (OpenMP) and none of gqa's developer flags.
  set(db "${consumer_build}/compile_commands.json")
  if(NOT EXISTS "${db}")
    message(FATAL_ERROR "[add_subdirectory] ${db} was not written (generator without compile_commands support?)")
  endif()
  file(READ "${db}" commands)
  if(NOT commands MATCHES "main\\.cpp" OR NOT commands MATCHES "-fopenmp")
    message(FATAL_ERROR "[add_subdirectory] expected main.cpp compiled with -fopenmp:\n${commands}")
  endif()
  foreach(flag "-march=native" "-Wpedantic" "-Werror")
    string(FIND "${commands}" "${flag}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "[add_subdirectory] gqa leaked ${flag} into the consumer:\n${commands}")
    endif()
  endforeach()
else()
  message(FATAL_ERROR "run_consumer.cmake: unknown MODE '${MODE}'")
endif()
message(STATUS "[${MODE}] consumer OK")
