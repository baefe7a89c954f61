// tests/support/compare.hpp — comparing kernel outputs with the double reference, with readable failures.
//
// Offers:
//   gqa_test::Tolerance        {atol, rtol}: element e passes iff |out_e - ref_e| <= atol + rtol * |ref_e|
//   gqa_test::measure()        max abs / max rel error, the worst element (relative to its allowance), NaN count
//   gqa_test::check_close()    Catch2 checks of the above: no non-finite output, and the worst element through
//                              Catch::Matchers::WithinAbs(ref, atol + rtol*|ref|) (so every element passes iff it does)
//   gqa_test::check_identical() bitwise equality of two tensors (thread-count and layout invariance)
//   gqa_test::check_lse_close() log-sum-exp rows, -inf where the reference has -inf
//   gqa_test::to_double()      widen any storage type (float, double, bfloat16, half) to double
//
// Tolerances are always chosen at the call site, with a comment saying why; this header has no defaults.
#pragma once

#include "gqa/types.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

namespace gqa_test {

using gqa::Index;

struct Tolerance {
  double atol;
  double rtol;
};

template <typename T>
double to_double(T x) {
  if constexpr (std::is_same_v<T, double> || std::is_same_v<T, float>) {
    return static_cast<double>(x);
  } else {
    return static_cast<double>(static_cast<float>(x));  // bfloat16 / half: exact through float
  }
}

template <typename T>
gqa::Tensor4<double> to_double(const gqa::Tensor4<T>& t) {
  gqa::Tensor4<double> r(t.dimensions());
  for (Index i = 0; i < t.size(); ++i) r.data()[i] = to_double(t.data()[i]);
  return r;
}

struct ErrorReport {
  Index count = 0;
  Index non_finite = 0;       // NaN or inf in the output
  Index failures = 0;         // elements outside atol + rtol*|ref|
  double max_abs = 0;         // max |out - ref|
  double max_rel = 0;         // max |out - ref| / |ref| over elements with |ref| > atol
  Index worst = -1;           // linear index of the element with the largest |out - ref| / (atol + rtol*|ref|)
  std::array<Index, 4> worst_at{};
  double worst_out = 0, worst_ref = 0, worst_ratio = 0;
  Tolerance tol{0, 0};

  std::string str() const {
    std::ostringstream os;
    os.precision(17);
    os << "elements " << count << ", failures " << failures << ", non-finite " << non_finite << "\nmax abs err "
       << max_abs << ", max rel err " << max_rel << " (atol " << tol.atol << ", rtol " << tol.rtol << ")";
    if (worst >= 0)
      os << "\nworst at [" << worst_at[0] << ", " << worst_at[1] << ", " << worst_at[2] << ", " << worst_at[3]
         << "]: out " << worst_out << " ref " << worst_ref << " (" << worst_ratio << " x allowance)";
    return os.str();
  }
};

template <typename T>
ErrorReport measure(const gqa::Tensor4<T>& out, const gqa::Tensor4<double>& ref, Tolerance tol) {
  ErrorReport r;
  r.tol = tol;
  r.count = out.size();
  for (Index i = 0; i < out.size(); ++i) {
    const double o = to_double(out.data()[i]), e = ref.data()[i];
    const double err = std::abs(o - e);
    const double allowance = tol.atol + tol.rtol * std::abs(e);
    double ratio = err / allowance;
    if (!std::isfinite(o)) {
      ++r.non_finite;
      ratio = std::numeric_limits<double>::infinity();
    }
    if (!(err <= allowance)) ++r.failures;
    if (std::isfinite(err)) {
      r.max_abs = std::max(r.max_abs, err);
      if (std::abs(e) > tol.atol) r.max_rel = std::max(r.max_rel, err / std::abs(e));
    }
    if (r.worst < 0 || ratio > r.worst_ratio || (std::isnan(ratio) && !std::isnan(r.worst_ratio))) {
      r.worst = i;
      r.worst_out = o;
      r.worst_ref = e;
      r.worst_ratio = std::isnan(ratio) ? std::numeric_limits<double>::infinity() : ratio;
    }
  }
  if (r.worst >= 0) {
    Index rest = r.worst;
    for (int d = 3; d >= 0; --d) {
      r.worst_at[size_t(d)] = rest % out.dimension(d);
      rest /= out.dimension(d);
    }
  }
  return r;
}

/// Checks |out - ref| <= atol + rtol*|ref| for every element. One Catch2 assertion on the worst element (with
/// the full report as INFO), so a failing sweep prints one readable line per case, not thousands.
template <typename T>
ErrorReport check_close(const gqa::Tensor4<T>& out, const gqa::Tensor4<double>& ref, Tolerance tol) {
  REQUIRE(out.dimensions() == ref.dimensions());
  const ErrorReport r = measure(out, ref, tol);
  INFO(r.str());
  CHECK(r.non_finite == 0);
  CHECK(r.failures == 0);
  if (r.worst >= 0)
    CHECK_THAT(r.worst_out, Catch::Matchers::WithinAbs(r.worst_ref, tol.atol + tol.rtol * std::abs(r.worst_ref)));
  return r;
}

/// Bitwise equality (the documented thread-count guarantee; also Tensor vs TensorMap over one buffer).
template <typename T>
void check_identical(const gqa::Tensor4<T>& a, const gqa::Tensor4<T>& b) {
  REQUIRE(a.dimensions() == b.dimensions());
  Index first = -1, differing = 0;
  for (Index i = 0; i < a.size(); ++i)
    if (std::memcmp(&a.data()[i], &b.data()[i], sizeof(T)) != 0) {
      if (first < 0) first = i;
      ++differing;
    }
  std::ostringstream os;
  os.precision(17);
  if (first >= 0)
    os << differing << " of " << a.size() << " elements differ; first at linear index " << first << ": "
       << to_double(a.data()[first]) << " vs " << to_double(b.data()[first]);
  INFO(os.str());
  CHECK(differing == 0);
}

/// Log-sum-exp rows: -inf exactly where the reference has -inf (rows with no visible key), else within tol.
inline void check_lse_close(const std::vector<float>& out, const std::vector<float>& ref, Tolerance tol) {
  REQUIRE(out.size() == ref.size());
  Index bad = 0, first = -1;
  for (size_t i = 0; i < out.size(); ++i) {
    const double o = out[i], e = ref[i];
    const bool ok = std::isinf(e) ? o == e : std::abs(o - e) <= tol.atol + tol.rtol * std::abs(e);
    if (!ok && bad++ == 0) first = Index(i);
  }
  std::ostringstream os;
  os.precision(10);
  if (first >= 0) os << bad << " lse rows differ; first row " << first << ": " << out[size_t(first)] << " vs ref "
                     << ref[size_t(first)];
  INFO(os.str());
  CHECK(bad == 0);
}

}  // namespace gqa_test
