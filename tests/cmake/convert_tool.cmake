# test_checkpoint also runs the gqa-convert tool end to end when the tools (GQA_BUILD_TOOLS) are built: the
# tool's path reaches the test as GQA_CONVERT_EXE, and building the test builds the tool first.
if(GQA_BUILD_TOOLS AND TARGET test_checkpoint)
  target_compile_definitions(test_checkpoint PRIVATE GQA_CONVERT_EXE="$<TARGET_FILE:gqa-convert>")
  add_dependencies(test_checkpoint gqa-convert)
endif()
