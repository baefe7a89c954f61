# test_uptrain also runs the gqa-uptrain command line end to end when the examples (which build it) are enabled:
# the binary's path reaches the test as GQA_UPTRAIN_EXE, and building the test builds the tool first.
if(GQA_BUILD_EXAMPLES AND TARGET test_uptrain AND EXISTS "${PROJECT_SOURCE_DIR}/examples/uptrain.cpp")
  target_compile_definitions(test_uptrain PRIVATE GQA_UPTRAIN_EXE="$<TARGET_FILE:gqa-uptrain>")
  add_dependencies(test_uptrain gqa-uptrain)
endif()
