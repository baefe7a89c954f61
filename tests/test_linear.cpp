// Tests of examples/model/linear.hpp: the decoder's products with float, bf16 and half weights, decode (one row of
// X: detail::gemv_rows, threaded by rows) and prefill (several rows: panels widened for Eigen's GEMM), against a
// double-precision reference on the weights' exact values; bitwise identical results for 1, 2 and 3 threads; the
// widening of every bf16 and half bit pattern's value; the float view refused for 16-bit weights.
#include "../examples/model/linear.hpp"

#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using gqa::Index;
using llama::Linear;
using llama::Matrix;
using llama::WeightType;

/// A random weight [rows, cols] stored as `type`, its exact values as double, and an optional bias.
struct Weight {
  WeightType type;
  Index rows, cols;
  std::vector<float> f32;
  std::vector<gqa::bfloat16> bf16;
  std::vector<gqa::half> f16;
  std::vector<double> exact;  // the stored values, widened
  std::vector<float> bias;

  Weight(WeightType t, Index r, Index c, std::uint64_t seed, bool with_bias = false) : type(t), rows(r), cols(c) {
    gqa_test::Rng rng(seed);
    for (Index i = 0; i < r * c; ++i) {
      const float v = float(rng.normal(0.0, 1.0 / std::sqrt(double(c))));
      if (t == WeightType::f32) f32.push_back(v), exact.push_back(double(v));
      if (t == WeightType::bf16) bf16.emplace_back(v), exact.push_back(double(float(bf16.back())));
      if (t == WeightType::f16) f16.emplace_back(v), exact.push_back(double(float(f16.back())));
    }
    if (with_bias)
      for (Index i = 0; i < r; ++i) bias.push_back(float(rng.normal(0.0, 0.1)));
  }
  Linear linear() const {
    Linear L;
    L.rows = rows, L.cols = cols, L.type = type;
    L.weight = type == WeightType::f32 ? static_cast<const void*>(f32.data())
               : type == WeightType::bf16 ? static_cast<const void*>(bf16.data()) : static_cast<const void*>(f16.data());
    L.bias = bias.empty() ? nullptr : bias.data();
    return L;
  }
};

Matrix random_matrix(Index rows, Index cols, std::uint64_t seed) {
  gqa_test::Rng rng(seed);
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = float(rng.normal());
  return m;
}

/// Y = X W^T + bias in double, and the scale sum_c |X[s, c] W[r, c]| (+ |bias|) each element's error is relative to.
void reference(const Matrix& X, const Weight& w, std::vector<double>& y, std::vector<double>& scale) {
  y.assign(size_t(X.rows() * w.rows), 0.0);
  scale.assign(y.size(), 0.0);
  for (Index s = 0; s < X.rows(); ++s)
    for (Index r = 0; r < w.rows; ++r) {
      double acc = w.bias.empty() ? 0.0 : double(w.bias[size_t(r)]), mag = std::abs(acc);
      for (Index c = 0; c < w.cols; ++c) {
        const double p = double(X(s, c)) * w.exact[size_t(r * w.cols + c)];
        acc += p, mag += std::abs(p);
      }
      y[size_t(s * w.rows + r)] = acc, scale[size_t(s * w.rows + r)] = mag;
    }
}

// A float dot product of n terms summed in 2 * kWidth lanes and then reduced: its error is at most about
// (n / (2 * kWidth) + log2(kWidth) + 3) float roundings of sum |x w| (each term exact in double: float times a
// widened 16-bit value). For n <= 1600 and the scalar fallback (kWidth 1, ~800 roundings) that is < 5e-5; measured
// max error / scale ~1e-7 on AVX-512. A weight read as the wrong type, a missed tail column or a misplaced panel
// is off by O(1) of the scale.
constexpr double kRelTol = 5e-5;

void check_close(const Matrix& Y, const std::vector<double>& ref, const std::vector<double>& scale) {
  double worst = 0;
  for (Index i = 0; i < Y.size(); ++i)
    worst = std::max(worst, std::abs(double(Y.data()[i]) - ref[size_t(i)]) / (scale[size_t(i)] + 1e-30));
  INFO("max |error| / sum |x w| = " << worst);
  CHECK(worst <= kRelTol);
}

const WeightType kTypes[] = {WeightType::f32, WeightType::bf16, WeightType::f16};

}  // namespace

// Column counts around the vector width (16 on AVX-512, 8 on AVX2, 1 portable) and its double: the two-chain
// blocks, the single block and the scalar tail; row counts around the threads' shares (multiples of 16 rows).
TEST_CASE("decode products match the double reference for f32, bf16 and f16 weights", "[linear]") {
  for (const WeightType type : kTypes)
    for (const Index cols : {Index(1), Index(7), Index(16), Index(33), Index(48), Index(581)})
      for (const Index rows : {Index(1), Index(17), Index(130)}) {
        INFO(llama::weight_type_name(type) << " [" << rows << ", " << cols << "]");
        const Weight w(type, rows, cols, std::uint64_t(rows * 1000 + cols), true);
        const Matrix X = random_matrix(1, cols, 7);
        Matrix Y;
        llama::detail::linear(X, {{w.linear(), Y}});
        REQUIRE(Y.rows() == 1);
        REQUIRE(Y.cols() == rows);
        std::vector<double> ref, scale;
        reference(X, w, ref, scale);
        check_close(Y, ref, scale);
      }
}

// A group of products sharing X (as q, k, v), large enough for the threaded paths (>= 64K weights), with rows
// that end panels early (panel_rows(300 + 77 + 77 = 454) = 32: panels of 32 rows with remainders).
TEST_CASE("grouped decode and prefill products match the double reference", "[linear]") {
  for (const WeightType type : kTypes)
    for (const Index S : {Index(1), Index(2), Index(37)}) {
      INFO(llama::weight_type_name(type) << ", S = " << S);
      const Index cols = 200;
      const Weight a(type, 300, cols, 1, true), b(type, 77, cols, 2), c(type, 77, cols, 3, true);
      const Matrix X = random_matrix(S, cols, 11);
      Matrix Ya, Yb, Yc;
      llama::detail::linear(X, {{a.linear(), Ya}, {b.linear(), Yb}, {c.linear(), Yc}});
      for (const auto& [w, Y] : {std::pair<const Weight&, const Matrix&>{a, Ya}, {b, Yb}, {c, Yc}}) {
        REQUIRE(Y.rows() == S);
        REQUIRE(Y.cols() == w.rows);
        std::vector<double> ref, scale;
        reference(X, w, ref, scale);
        check_close(Y, ref, scale);
      }
    }
}

TEST_CASE("panels are a function of the shapes: 1/16 of the rows, multiples of 16, within [32, 256]", "[linear]") {
  CHECK(llama::detail::panel_rows(1) == 32);
  CHECK(llama::detail::panel_rows(960) == 64);     // SmolLM2's q, k, v: 15 panels
  CHECK(llama::detail::panel_rows(576) == 48);     // o_proj, down_proj: 12 panels
  CHECK(llama::detail::panel_rows(3072) == 192);   // gate, up: 16 panels
  CHECK(llama::detail::panel_rows(49152) == 256);  // lm_head
}

// The work split depends only on the shapes, and every element is computed by one dot product or one panel GEMM
// whatever thread runs it: the bits are the same for any thread count.
TEST_CASE("products are bitwise identical for 1, 2 and 3 threads", "[linear]") {
  const int saved = omp_get_max_threads();
  for (const WeightType type : kTypes)
    for (const Index S : {Index(1), Index(9)}) {
      INFO(llama::weight_type_name(type) << ", S = " << S);
      const Weight a(type, 400, 192, 5, true), b(type, 130, 192, 6);
      const Matrix X = random_matrix(S, 192, 13);
      std::vector<Matrix> outs;
      for (const int threads : {1, 2, 3}) {
        omp_set_num_threads(threads);
        Matrix Ya, Yb;
        llama::detail::linear(X, {{a.linear(), Ya}, {b.linear(), Yb}});
        Matrix both(S, 530);
        both << Ya, Yb;
        outs.push_back(both);
      }
      CHECK(outs[0] == outs[1]);
      CHECK(outs[0] == outs[2]);
    }
  omp_set_num_threads(saved);
}

// Every bf16 and half bit pattern that is finite widens to its exact float value (vector body and scalar tail).
TEST_CASE("widen_rows gives every finite bf16 and half value exactly", "[linear]") {
  std::vector<gqa::bfloat16> bf;
  std::vector<gqa::half> hf;
  for (std::uint32_t bits = 0; bits < 65536; ++bits) {
    const std::uint16_t b = std::uint16_t(bits);
    const gqa::bfloat16 x = Eigen::numext::bit_cast<gqa::bfloat16>(b);
    const gqa::half h = Eigen::numext::bit_cast<gqa::half>(b);
    if (std::isfinite(float(x))) bf.push_back(x);
    if (std::isfinite(float(h))) hf.push_back(h);
  }
  // One row each: the vector loop, then a scalar tail (5 values repeated: 65280 and 63488 finite values are
  // multiples of 16).
  bf.insert(bf.end(), bf.begin() + 1000, bf.begin() + 1005);
  hf.insert(hf.end(), hf.begin() + 1000, hf.begin() + 1005);
  Linear L;
  L.type = WeightType::bf16, L.rows = 1, L.cols = Index(bf.size()), L.weight = bf.data();
  std::vector<float> out(bf.size());
  llama::detail::widen_rows(L, 0, 1, out.data());
  Index wrong = 0;
  for (size_t i = 0; i < bf.size(); ++i) wrong += out[i] != float(bf[i]) || std::signbit(out[i]) != std::signbit(float(bf[i]));
  CHECK(wrong == 0);
  L.type = WeightType::f16, L.cols = Index(hf.size()), L.weight = hf.data();
  out.assign(hf.size(), 0.0f);
  llama::detail::widen_rows(L, 0, 1, out.data());
  for (size_t i = 0; i < hf.size(); ++i) wrong += out[i] != float(hf[i]) || std::signbit(out[i]) != std::signbit(float(hf[i]));
  CHECK(wrong == 0);
}

TEST_CASE("a float view of a 16-bit weight is refused; bytes count the stored width", "[linear]") {
  const Weight w(WeightType::bf16, 4, 8, 1, true);
  CHECK_THROWS_AS(w.linear().w(), gqa::invalid_argument);
  CHECK_THROWS_WITH(w.linear().w(), Catch::Matchers::Contains("[gqa.decoder.weights]") &&
                                        Catch::Matchers::Contains("bf16"));
  CHECK(w.linear().bytes() == 4 * 8 * 2 + 4 * 4);
  const Weight f(WeightType::f32, 4, 8, 1);
  CHECK(f.linear().w()(1, 2) == f.f32[1 * 8 + 2]);
  CHECK(f.linear().bytes() == 4 * 8 * 4);
}
