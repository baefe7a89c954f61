# test_decoder also runs the example_decoder command line end to end when the examples (which build it) are enabled:
# the binary's path reaches the test as GQA_DECODER_EXE, and building the test builds the example first.
# Included from tests/CMakeLists.txt; examples/ is added later, but target names resolve at generate time.
if(GQA_BUILD_EXAMPLES AND TARGET test_decoder AND EXISTS "${PROJECT_SOURCE_DIR}/examples/decoder.cpp")
  target_compile_definitions(test_decoder PRIVATE GQA_DECODER_EXE="$<TARGET_FILE:example_decoder>")
  add_dependencies(test_decoder example_decoder)
endif()
