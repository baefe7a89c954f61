# ODR test: test_odr (from tests/test_odr.cpp) gets two more translation units that also include the umbrella
# header gqa/gqa.hpp, so any header definition that is not inline breaks the link. Included from
# tests/CMakeLists.txt, after the test_* targets exist.
if(TARGET test_odr)  # built with the compile checks (GQA_COMPILE_CHECKS)
  target_sources(test_odr PRIVATE
    ${CMAKE_CURRENT_SOURCE_DIR}/odr/odr_a.cpp
    ${CMAKE_CURRENT_SOURCE_DIR}/odr/odr_b.cpp)
endif()
