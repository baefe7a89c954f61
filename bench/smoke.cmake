# One tiny case of a benchmark binary, as a ctest (ggml's test-backend-ops idea): proves the binary starts,
# registers its benchmarks, and runs one to completion without a Google Benchmark error.
#   cmake -DBENCH=<binary> -P smoke.cmake
# The case: among the names without a baseline/ or reference/ prefix, the smallest S: (then threads:1, then the
# first listed), so a new benchmark binary needs nothing here.
cmake_minimum_required(VERSION 3.16)
if(NOT BENCH)
  message(FATAL_ERROR "smoke.cmake: -DBENCH=<benchmark binary> is required")
endif()
execute_process(COMMAND "${BENCH}" --benchmark_list_tests RESULT_VARIABLE rc OUTPUT_VARIABLE listed
                ERROR_VARIABLE err)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${BENCH} --benchmark_list_tests failed (${rc}): ${err}")
endif()
string(REPLACE "\n" ";" names "${listed}")
set(best "")
set(best_key "")
foreach(name IN LISTS names)
  if(name STREQUAL "" OR name MATCHES "^(baseline|reference)/")
    continue()
  endif()
  set(s 999999999)
  if(name MATCHES "/S:([0-9]+)")
    set(s ${CMAKE_MATCH_1})
  endif()
  set(more_threads 0)
  if(name MATCHES "/threads:([0-9]+)" AND CMAKE_MATCH_1 GREATER 1)
    set(more_threads 1)
  endif()
  math(EXPR key "${s} * 2 + ${more_threads}")  # smallest S first, then one thread
  if(best STREQUAL "" OR key LESS best_key)
    set(best "${name}")
    set(best_key ${key})
  endif()
endforeach()
if(best STREQUAL "")
  message(FATAL_ERROR "${BENCH} lists no benchmark to smoke-test:\n${listed}")
endif()

string(REGEX REPLACE "([][.+*?()|{}^$\\\\])" "\\\\\\1" filter "${best}")
message(STATUS "smoke run: ${best}")
execute_process(COMMAND "${BENCH}" "--benchmark_filter=^${filter}$" --benchmark_min_time=0
                        --benchmark_format=json
                RESULT_VARIABLE rc OUTPUT_VARIABLE json ERROR_VARIABLE err)
if(NOT rc EQUAL 0 OR NOT json MATCHES "\"name\": \"${filter}\"" OR json MATCHES "\"error_occurred\": true")
  message(FATAL_ERROR "smoke run of ${best} failed (exit ${rc}):\n${json}\n${err}")
endif()
string(REGEX MATCH "\"real_time\": [0-9.e+-]+" time "${json}")
message(STATUS "ok: ${best} (${time})")
