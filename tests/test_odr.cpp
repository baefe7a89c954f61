// ODR test: gqa/gqa.hpp included from three translation units (this one, odr/odr_a.cpp, odr/odr_b.cpp) linked
// into one binary; the two odr/ TUs instantiate the same kernels. Linking at all proves no header defines a
// non-inline function or variable; the checks below prove the inline entities really are one entity per program
// and that exceptions cross TUs by type.
#include <catch2/catch.hpp>

#include <gqa/gqa.hpp>

#include "odr/odr.hpp"

#include <string>

TEST_CASE("two TUs including gqa/gqa.hpp compute the same, correct result", "[odr]") {
  const odr_test::Result a = odr_test::run_a();
  const odr_test::Result b = odr_test::run_b();
  REQUIRE(a.out.size() == std::size_t(odr_test::kB * odr_test::kS * odr_test::kH * odr_test::kD));
  REQUIRE(a.out.size() == b.out.size());
  CHECK(a.max_diff >= 0);
  CHECK(a.max_diff < 1e-5);
  CHECK(b.max_diff >= 0);
  CHECK(b.max_diff < 1e-5);
  // Same inputs, same kernel, one thread: the outputs are bitwise equal.
  CHECK(a.out == b.out);
}

TEST_CASE("inline entities of gqa have one address across TUs", "[odr]") {
  const odr_test::Result a = odr_test::run_a();
  const odr_test::Result b = odr_test::run_b();
  // Compared between odr_a.cpp and odr_b.cpp only: taking the addresses here too would instantiate the kernel in
  // a third TU, which costs a minute of sanitizer build time and proves nothing more.
  REQUIRE(a.attention != nullptr);
  REQUIRE(a.reference != nullptr);
  CHECK(a.attention == b.attention);
  CHECK(a.reference == b.reference);
  CHECK(a.dynamic == b.dynamic);
  CHECK(a.dynamic == &gqa::Dynamic);
}

TEST_CASE("gqa exceptions thrown in one TU are caught by type in another", "[odr]") {
  try {
    odr_test::bad_shape_b();
    FAIL("gqa::attention accepted G = 4 with H = 6");
  } catch (const gqa::shape_error& e) {
    CHECK(std::string(e.what()).rfind("[gqa.shape]", 0) == 0);
  }
  CHECK_THROWS_AS(odr_test::bad_shape_b(), gqa::invalid_argument);
}
