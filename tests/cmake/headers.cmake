# Header boundaries, checked on every build. Included from tests/CMakeLists.txt.
#   gqa_header_check      (GQA_COMPILE_CHECKS) one translation unit per public header include/gqa/*.hpp, including it alone (twice):
#                         each header includes what it uses. The one for gqa/gqa.hpp also fails if the umbrella
#                         pulled in nlohmann_json, which only gqa::checkpoint may need, or MPI, which only
#                         gqa::mpi (gqa/distributed.hpp, checked only where MPI is found) may need.
#   detail_header_guard.* each include/gqa/detail/*.hpp preprocessed alone must stop at the #error of
#                         gqa/detail/internal_header_check.hpp: users cannot include the machinery directly.

file(GLOB gqa_public_headers CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/include/gqa/*.hpp")
if(NOT GQA_COMPILE_CHECKS)
  set(gqa_public_headers)
endif()
if(NOT TARGET gqa_mpi)  # gqa/distributed.hpp includes <mpi.h>: checked where MPI is found
  list(REMOVE_ITEM gqa_public_headers "${PROJECT_SOURCE_DIR}/include/gqa/distributed.hpp")
endif()
set(gqa_header_tus)
foreach(header IN LISTS gqa_public_headers)
  get_filename_component(name "${header}" NAME_WE)
  set(code "#include <gqa/${name}.hpp>\n#include <gqa/${name}.hpp>  // a second time: #pragma once holds\n")
  if(name STREQUAL "gqa")
    string(APPEND code "#ifdef NLOHMANN_JSON_VERSION_MAJOR\n"
                       "#error \"gqa/gqa.hpp (gqa::gqa) pulled in nlohmann_json, which only gqa::checkpoint needs\"\n"
                       "#endif\n"
                       "#ifdef MPI_VERSION\n"
                       "#error \"gqa/gqa.hpp (gqa::gqa) pulled in mpi.h, which only gqa::mpi needs\"\n"
                       "#endif\n")
  endif()
  string(APPEND code "int gqa_header_check_${name}() { return 0; }\n")
  set(tu "${CMAKE_CURRENT_BINARY_DIR}/header_check/${name}.cpp")
  file(WRITE "${tu}.in" "${code}")
  configure_file("${tu}.in" "${tu}" COPYONLY)  # rewritten only when it changes, so nothing rebuilds needlessly
  list(APPEND gqa_header_tus "${tu}")
endforeach()
if(gqa_header_tus)
  add_library(gqa_header_check OBJECT ${gqa_header_tus})
  target_link_libraries(gqa_header_check PRIVATE gqa::checkpoint gqa_dev_flags gqa_test_code_flags)
  if(TARGET gqa_mpi)
    target_link_libraries(gqa_header_check PRIVATE gqa::mpi)
  endif()
endif()

file(GLOB gqa_detail_headers CONFIGURE_DEPENDS "${PROJECT_SOURCE_DIR}/include/gqa/detail/*.hpp")
list(REMOVE_ITEM gqa_detail_headers "${PROJECT_SOURCE_DIR}/include/gqa/detail/internal_header_check.hpp")
foreach(header IN LISTS gqa_detail_headers)
  get_filename_component(name "${header}" NAME_WE)
  add_test(NAME detail_header_guard.${name}
           COMMAND ${CMAKE_CXX_COMPILER} -std=c++17 -E -I${PROJECT_SOURCE_DIR}/include "${header}")
  set_tests_properties(detail_header_guard.${name} PROPERTIES LABELS headers
                       # The check must be included by this header itself (not through another detail header),
                       # so the compiler's "In file included from" names this header right before the #error.
                       PASS_REGULAR_EXPRESSION
                       "In file included from [^\n]*detail/${name}\\.hpp:[0-9]+:\n[^\n]*internal_header_check\\.hpp:[0-9]+:[0-9]+: error: #error")
endforeach()
