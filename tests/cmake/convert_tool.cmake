# test_checkpoint also runs the gqa-convert tool end to end when the examples (which build it) are enabled: the
# tool's path reaches the test as GQA_CONVERT_EXE, and building the test builds the tool first.
if(GQA_BUILD_EXAMPLES AND TARGET test_checkpoint)
  target_compile_definitions(test_checkpoint PRIVATE GQA_CONVERT_EXE="$<TARGET_FILE:gqa-convert>")
  add_dependencies(test_checkpoint gqa-convert)
endif()
