// Tests of gqa/detail/tile_gemm.hpp, prefill's register-blocked tile products, on their own (flash_fwd uses them only
// where tile::kUsed, but they are tested on every target): scores S^T = K Q^T from packed Q^T panels and
// O += P V from the transposed probabilities, for float and double, over row counts that leave partial panels and
// partial register blocks, key counts that leave partial blocks, and head dims with partial column blocks. K and V
// rows sit in strided buffers whose gaps hold NaN, which must never be read. Inputs are normal(0, 1) (probabilities
// uniform [0, 1)); the references are long double.
//
// Tolerance: a sum of n products in precision u, in any order, errs by at most gamma_n * sum |products| with
// gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 3.1); each element is checked against that bound with
// n + 2 terms (the stored result's rounding, and the output's previous value), which a misplaced row, key or column
// exceeds by orders of magnitude.
#include "gqa/attention.hpp"  // the public header first: the detail headers are internal

#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

namespace tile = gqa::detail::tile;
using gqa::Index;

template <typename T>
double gamma(Index n) {
  const double u = std::numeric_limits<T>::epsilon() / 2;
  return double(n) * u / (1.0 - double(n) * u);
}

/// `rows` rows of `cols` normal values with row stride `stride` > cols, NaN in the gaps.
template <typename T>
std::vector<T> strided_rows(Index rows, Index cols, Index stride, std::uint64_t seed) {
  std::vector<T> buf(size_t(rows * stride), std::numeric_limits<T>::quiet_NaN());
  gqa_test::Rng rng(seed);
  for (Index j = 0; j < rows; ++j)
    for (Index d = 0; d < cols; ++d) buf[size_t(j * stride + d)] = T(rng.normal());
  return buf;
}

template <typename T>
void check_scores(Index rows, Index D, Index n) {
  const Index stride = D + 3;
  gqa_test::Rng rng(std::uint64_t(rows * 1000 + D * 10 + n));
  std::vector<T> q(size_t(rows * D));
  for (auto& x : q) x = T(rng.normal());
  const auto k = strided_rows<T>(n, D, stride, std::uint64_t(rows + 7 * n));
  Eigen::Matrix<T, Eigen::Dynamic, 1> panels(tile::qt_panels_size<T>(rows, D));  // Eigen-aligned, as required
  std::vector<T> st(size_t(n * rows), T(-1));
  tile::pack_qt_panels(q.data(), rows, D, panels.data());
  tile::scores(panels.data(), rows, k.data(), stride, n, D, st.data());
  Index bad = 0;
  for (Index j = 0; j < n; ++j)
    for (Index r = 0; r < rows; ++r) {
      long double dot = 0, abs_sum = 0;
      for (Index d = 0; d < D; ++d) {
        const long double prod = (long double)q[size_t(r * D + d)] * k[size_t(j * stride + d)];
        dot += prod;
        abs_sum += std::abs(prod);
      }
      const double err = double(std::abs(st[size_t(j * rows + r)] - dot));
      bad += !(err <= gamma<T>(D + 2) * double(abs_sum) + 1e-300);
    }
  INFO("rows " << rows << ", D " << D << ", keys " << n);
  CHECK(bad == 0);
}

template <typename T>
void check_pv(Index rows, Index D, Index n) {
  const Index stride = D + 5, ld_out = D + 2;
  gqa_test::Rng rng(std::uint64_t(rows * 977 + D + n));
  std::vector<T> pt(size_t(n * rows)), out(size_t(rows * ld_out)), before;
  for (auto& x : pt) x = T(rng.uniform01());
  for (auto& x : out) x = T(rng.normal());
  before = out;
  const auto v = strided_rows<T>(n, D, stride, std::uint64_t(3 * rows + n));
  tile::add_product(tile::ColMajor<T>{pt.data(), rows}, rows, v.data(), stride, n, D, out.data(), ld_out);
  Index bad = 0, touched = 0;
  for (Index r = 0; r < rows; ++r) {
    for (Index d = 0; d < D; ++d) {
      long double sum = before[size_t(r * ld_out + d)], abs_sum = std::abs(sum);
      for (Index j = 0; j < n; ++j) {
        const long double prod = (long double)pt[size_t(j * rows + r)] * v[size_t(j * stride + d)];
        sum += prod;
        abs_sum += std::abs(prod);
      }
      const double err = double(std::abs(out[size_t(r * ld_out + d)] - sum));
      bad += !(err <= gamma<T>(n + 2) * double(abs_sum) + 1e-300);
    }
    for (Index d = D; d < ld_out; ++d) touched += out[size_t(r * ld_out + d)] != before[size_t(r * ld_out + d)];
  }
  INFO("rows " << rows << ", D " << D << ", keys " << n);
  CHECK(bad == 0);
  CHECK(touched == 0);  // columns past D are not the output's
}

}  // namespace

TEMPLATE_TEST_CASE("tile::scores matches long double dot products", "[tile_gemm][scores]", float, double) {
  constexpr Index L = gqa::detail::mk::kLanes<TestType>, W = tile::kPanelRows<TestType>;
  for (Index rows : {Index(1), Index(5), W - 1, W, W + 3, 2 * W, Index(130)})
    for (Index n : {Index(1), Index(tile::kScoreKeys - 1), Index(tile::kScoreKeys), Index(37), Index(128)})
      for (Index D : {L, 3 * L, Index(128)}) check_scores<TestType>(rows, D, n);
}

TEMPLATE_TEST_CASE("tile::add_product (ColMajor) adds P V to the output and nothing else", "[tile_gemm][pv]", float, double) {
  constexpr Index L = gqa::detail::mk::kLanes<TestType>;
  for (Index rows : {Index(1), Index(tile::kProductRows - 1), Index(tile::kProductRows), Index(13), Index(128)})
    for (Index n : {Index(1), Index(7), Index(128)})
      for (Index D : {L, Index(tile::kProductPackets + 1) * L, Index(128)}) check_pv<TestType>(rows, D, n);
}

TEST_CASE("tile::pack_qt_panels zero-pads the last panel", "[tile_gemm]") {
  constexpr Index W = tile::kPanelRows<float>;
  const Index rows = W + 2, D = 3;
  std::vector<float> q(size_t(rows * D));
  for (Index i = 0; i < rows * D; ++i) q[size_t(i)] = float(i + 1);
  std::vector<float> panels(size_t(tile::qt_panels_size<float>(rows, D)), -1.0f);
  REQUIRE(panels.size() == size_t(2 * W * D));
  tile::pack_qt_panels(q.data(), rows, D, panels.data());
  for (Index r = 0; r < 2 * W; ++r)
    for (Index d = 0; d < D; ++d) {
      const float want = r < rows ? q[size_t(r * D + d)] : 0.0f;
      CHECK(panels[size_t(r / W * W * D + d * W + r % W)] == want);
    }
}
