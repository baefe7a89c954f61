# Documentation code is compiled (and run, where it is a program), so it cannot rot (the readme_block_* part only
# with GQA_COMPILE_CHECKS, which the sanitizer build turns off: the tests run the same code there):
#   readme_block_<n>         the n-th ```cpp block of README.md (1-based), extracted at configure time. A block with
#                            `int main(` is a program, built and run as ctest readme_block_<n>. Any other block is
#                            a fragment: its #include lines go to the top and the rest becomes the body of a
#                            function, compiled (not run: fragments name files and data that do not exist here).
#                            A block that includes gqa/distributed.hpp is compiled only where MPI is found.
#   example_basic_attention  examples/basic_attention.cpp (built by examples/CMakeLists.txt), run as a test
# Included from tests/CMakeLists.txt.

set(GQA_README "${PROJECT_SOURCE_DIR}/README.md")
if(GQA_COMPILE_CHECKS)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${GQA_README}")  # re-extract when it changes
  file(READ "${GQA_README}" gqa_readme_rest)

  set(gqa_block 0)
  set(gqa_fragment_sources)
  while(TRUE)
    string(FIND "${gqa_readme_rest}" "\n```cpp\n" gqa_begin)
    if(gqa_begin EQUAL -1)
      break()
    endif()
    math(EXPR gqa_block "${gqa_block} + 1")
    math(EXPR gqa_begin "${gqa_begin} + 8")  # skip "\n```cpp\n"
    string(SUBSTRING "${gqa_readme_rest}" ${gqa_begin} -1 gqa_readme_rest)
    string(FIND "${gqa_readme_rest}" "\n```" gqa_end)
    if(gqa_end EQUAL -1)
      message(FATAL_ERROR "README.md: ```cpp block ${gqa_block} is not closed")
    endif()
    math(EXPR gqa_end "${gqa_end} + 1")  # keep the block's last newline
    string(SUBSTRING "${gqa_readme_rest}" 0 ${gqa_end} gqa_code)
    string(SUBSTRING "${gqa_readme_rest}" ${gqa_end} -1 gqa_readme_rest)

    if(gqa_code MATCHES "#include <gqa/distributed.hpp>" AND NOT TARGET gqa_mpi)
      continue()  # needs MPI (gqa::mpi), not found here
    endif()
    set(gqa_header
        "// Extracted from README.md (```cpp block ${gqa_block}) by tests/cmake/readme.cmake. Do not edit.\n")
    if(gqa_code MATCHES "int main\\(")
      set(gqa_tu_code "${gqa_header}${gqa_code}")
    else()
      # Fragment: includes first, then the code as a function body; <cstdio>, <string> and <vector> are common
      # enough in snippets that the wrapper provides them.
      string(REGEX MATCHALL "#include[^\n]*\n" gqa_includes "${gqa_code}")
      string(REGEX REPLACE "#include[^\n]*\n" "" gqa_body "${gqa_code}")
      string(REPLACE ";" "" gqa_includes "${gqa_includes}")
      set(gqa_tu_code "${gqa_header}${gqa_includes}\n#include <cstdio>\n#include <string>\n#include <vector>\n\n"
                      "void readme_block_${gqa_block}() {\n${gqa_body}}\n")
    endif()
    # Through configure_file so the file (and its object) only change when the block does.
    set(gqa_tu "${CMAKE_CURRENT_BINARY_DIR}/readme/readme_block_${gqa_block}.cpp")
    file(WRITE "${gqa_tu}.in" "${gqa_tu_code}")
    configure_file("${gqa_tu}.in" "${gqa_tu}" COPYONLY)
    if(gqa_code MATCHES "int main\\(")
      add_executable(readme_block_${gqa_block} "${gqa_tu}")
      target_link_libraries(readme_block_${gqa_block} PRIVATE gqa::checkpoint gqa_dev_flags gqa_test_code_flags)
      gqa_use_prebuilt(readme_block_${gqa_block})
      add_test(NAME readme_block_${gqa_block} COMMAND readme_block_${gqa_block})
      set_tests_properties(readme_block_${gqa_block} PROPERTIES LABELS docs TIMEOUT 300)
    else()
      list(APPEND gqa_fragment_sources "${gqa_tu}")
    endif()
  endwhile()
  if(gqa_block EQUAL 0)
    message(FATAL_ERROR "README.md has no ```cpp block for the readme tests")
  endif()
  if(gqa_fragment_sources)
    add_library(readme_fragments OBJECT ${gqa_fragment_sources})
    target_link_libraries(readme_fragments PRIVATE gqa::checkpoint gqa_dev_flags gqa_test_code_flags)
    if(TARGET gqa_mpi)  # for a block of gqa/distributed.hpp
      target_link_libraries(readme_fragments PRIVATE gqa::mpi)
    endif()
    gqa_use_prebuilt(readme_fragments)  # compiles every line of the blocks; the kernels' bodies are compiled once
    # Fragments show calls whose results the reader would go on to use.
    target_compile_options(readme_fragments PRIVATE -Wno-unused-variable -Wno-unused-but-set-variable)
  endif()
endif()

# examples/ is added after tests/, but add_test resolves target names at generate time.
if(GQA_BUILD_EXAMPLES AND EXISTS "${PROJECT_SOURCE_DIR}/examples/basic_attention.cpp")
  add_test(NAME example_basic_attention COMMAND example_basic_attention)
  set_tests_properties(example_basic_attention PROPERTIES LABELS docs TIMEOUT 300)
endif()
if(GQA_BUILD_EXAMPLES AND EXISTS "${PROJECT_SOURCE_DIR}/examples/serve.cpp")
  add_test(NAME example_serve COMMAND example_serve)
  set_tests_properties(example_serve PROPERTIES LABELS docs TIMEOUT 300 PASS_REGULAR_EXPRESSION "max \\|out - reference\\| [0-9.e+-]+  ok")
endif()
