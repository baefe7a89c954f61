# Packaging tests: gqa consumed the two ways users consume it, each a tiny project configured, built and run
# at test time by tests/packaging/run_consumer.cmake (see there for the steps). Debug: what is under test is the
# package, not the kernels' speed, and -O0 compiles the consumers several times faster.
#   packaging_find_package      cmake --install into a scratch prefix, then find_package(gqa 0.1 REQUIRED)
#   packaging_add_subdirectory  add_subdirectory(<gqa source>): no tests/benchmarks/examples, no leaked flags
# Included from tests/CMakeLists.txt.
foreach(mode find_package add_subdirectory)
  add_test(NAME packaging_${mode}
    COMMAND ${CMAKE_COMMAND}
      -DMODE=${mode}
      -DGQA_SOURCE_DIR=${PROJECT_SOURCE_DIR}
      -DWORK_DIR=${CMAKE_CURRENT_BINARY_DIR}/packaging/${mode}
      -DCXX_COMPILER=${CMAKE_CXX_COMPILER}
      -DGENERATOR=${CMAKE_GENERATOR}
      -DMAKE_PROGRAM=${CMAKE_MAKE_PROGRAM}
      -DBUILD_TYPE=Debug
      -P ${CMAKE_CURRENT_SOURCE_DIR}/packaging/run_consumer.cmake)
  # The longest tests (a CMake configure and build each): a high COST makes ctest -j start them first, beside the
  # rest, instead of last and alone.
  set_tests_properties(packaging_${mode} PROPERTIES LABELS packaging TIMEOUT 600 COST 1000)
endforeach()
