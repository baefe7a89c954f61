# Documentation code is compiled and run, so it cannot rot:
#   readme_example           the first ```cpp block of README.md, extracted at configure time into the build dir
#   example_basic_attention  examples/basic_attention.cpp (built by examples/CMakeLists.txt), run as a test
# Included from tests/CMakeLists.txt.

set(GQA_README "${PROJECT_SOURCE_DIR}/README.md")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS "${GQA_README}")  # re-extract when it changes
file(READ "${GQA_README}" gqa_readme_text)
string(FIND "${gqa_readme_text}" "\n```cpp\n" gqa_readme_begin)
if(gqa_readme_begin EQUAL -1)
  message(FATAL_ERROR "README.md has no ```cpp block for the readme_example test")
endif()
math(EXPR gqa_readme_begin "${gqa_readme_begin} + 8")  # skip "\n```cpp\n"
string(SUBSTRING "${gqa_readme_text}" ${gqa_readme_begin} -1 gqa_readme_rest)
string(FIND "${gqa_readme_rest}" "\n```" gqa_readme_end)
if(gqa_readme_end EQUAL -1)
  message(FATAL_ERROR "README.md: the first ```cpp block is not closed")
endif()
math(EXPR gqa_readme_end "${gqa_readme_end} + 1")  # keep the block's last newline
string(SUBSTRING "${gqa_readme_rest}" 0 ${gqa_readme_end} gqa_readme_code)

# Written through configure_file so the file (and the binary) only change when the block does.
file(WRITE "${CMAKE_CURRENT_BINARY_DIR}/readme_example.cpp.in"
  "// Extracted from README.md (first ```cpp block) by tests/cmake/readme.cmake. Do not edit.\n${gqa_readme_code}")
configure_file("${CMAKE_CURRENT_BINARY_DIR}/readme_example.cpp.in" "${CMAKE_CURRENT_BINARY_DIR}/readme_example.cpp"
  COPYONLY)

add_executable(readme_example "${CMAKE_CURRENT_BINARY_DIR}/readme_example.cpp")
target_link_libraries(readme_example PRIVATE gqa::gqa gqa_dev_flags)
add_test(NAME readme_example COMMAND readme_example)
set_tests_properties(readme_example PROPERTIES LABELS docs TIMEOUT 300)

# examples/ is added after tests/, but add_test resolves target names at generate time.
if(GQA_BUILD_EXAMPLES AND EXISTS "${PROJECT_SOURCE_DIR}/examples/basic_attention.cpp")
  add_test(NAME example_basic_attention COMMAND example_basic_attention)
  set_tests_properties(example_basic_attention PROPERTIES LABELS docs TIMEOUT 300)
endif()
