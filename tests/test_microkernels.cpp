// Tests of gqa/detail/microkernels.hpp, the decode path's register-blocked products, on their own: the score
// product in each of its forms (every row count up to kMaxRows, which covers every DotRows and
// OuterPackets instantiation), the probabilities x V product, and the softmax's exp. Inputs are normal(0, 1); the
// references are double.
//
// Tolerance: a float sum of D products, accumulated in any order, errs by at most gamma_D * sum |products| with
// gamma_D = D u / (1 - D u), u = 2^-24 (Higham, Accuracy and Stability, 3.1). Each element is checked against that
// bound (with D + 2 for the rounding of the inputs' widening and of the stored result), which a misplaced row,
// key or column exceeds by orders of magnitude.
#include "gqa/attention.hpp"  // the public header first: the detail headers are internal

#include "support/compare.hpp"
#include "support/random.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

namespace mk = gqa::detail::mk;
using gqa::Index;

constexpr double kUnit = 0x1.0p-24;  // float unit roundoff

double gamma(Index n) { return double(n) * kUnit / (1.0 - double(n) * kUnit); }

/// Rows of `cols` values in a buffer with row stride `stride` > cols, with values that must never be read in
/// between: NaN, or for int8 (normal values times 16, rounded) the extreme -128.
template <typename T>
std::vector<T> strided_rows(Index rows, Index cols, Index stride, std::uint64_t seed) {
  constexpr bool is_int8 = std::is_same_v<T, std::int8_t>;
  std::vector<T> buf(size_t(rows * stride), is_int8 ? T(-128) : T(std::numeric_limits<float>::quiet_NaN()));
  gqa_test::Rng rng(seed);
  for (Index j = 0; j < rows; ++j)
    for (Index d = 0; d < cols; ++d) {
      const float x = float(rng.normal());
      buf[size_t(j * stride + d)] = is_int8 ? T(std::clamp(std::lround(16 * x), -127L, 127L)) : T(x);
    }
  return buf;
}

/// Runs score_tile for `rows` queries against n keys of type Src and checks every score against a double dot.
template <typename Src>
void check_scores(Index rows, Index D, Index n) {
  const Index stride = D + 3;
  gqa_test::Rng rng(std::uint64_t(rows * 1000 + D * 10 + n));
  std::vector<float> q(size_t(rows * D));
  for (auto& x : q) x = float(rng.normal());
  const auto k = strided_rows<Src>(n, D, stride, std::uint64_t(rows + 7 * n));
  // Eigen's allocator: the outer form reads the packed queries with aligned loads.
  Eigen::Matrix<float, Eigen::Dynamic, 1> packed(mk::packed_queries_size<float>(D));
  std::vector<float> st(size_t(n * rows), -1.0f);
  mk::pack_queries<float, Src>(q.data(), rows, D, packed.data());
  const mk::KVRows<Src> k_rows{k.data(), stride, n, D, n};
  mk::score_tile(packed.data(), rows, k_rows, st.data());
  Index bad = 0;
  double worst = 0;
  for (Index j = 0; j < n; ++j)
    for (Index r = 0; r < rows; ++r) {
      double dot = 0, abs_sum = 0;
      for (Index d = 0; d < D; ++d) {
        const double prod = double(q[size_t(r * D + d)]) * double(float(k[size_t(j * stride + d)]));
        dot += prod;
        abs_sum += std::abs(prod);
      }
      const double err = std::abs(double(st[size_t(j * rows + r)]) - dot);
      const double bound = gamma(D + 2) * abs_sum + 1e-30;
      worst = std::max(worst, err / bound);
      bad += !(err <= bound);
    }
  INFO("rows " << rows << ", D " << D << ", keys " << n << ": worst error " << worst << " x the bound");
  CHECK(bad == 0);
}

/// Runs accumulate_pv for M rows of probabilities over n keys of V (type Src) onto a nonzero output, and checks it.
template <typename Src>
void check_pv(Index M, Index D, Index n) {
  const Index stride = D + 5, ld_out = D + 2;
  gqa_test::Rng rng(std::uint64_t(M * 977 + D + n));
  std::vector<float> pt(size_t(n * M)), out(size_t(M * ld_out)), before;
  for (auto& x : pt) x = float(rng.uniform01());
  for (auto& x : out) x = float(rng.normal());
  before = out;
  const auto v = strided_rows<Src>(n, D, stride, std::uint64_t(3 * M + n));
  mk::accumulate_pv(mk::Strided<const float>{pt.data(), M}, M, mk::KVRows<Src>{v.data(), stride, n, D, n},
                    mk::Strided<float>{out.data(), ld_out});
  Index bad = 0, touched = 0;
  for (Index r = 0; r < M; ++r) {
    for (Index d = 0; d < D; ++d) {
      double sum = before[size_t(r * ld_out + d)], abs_sum = std::abs(sum);
      for (Index j = 0; j < n; ++j) {
        const double prod = double(pt[size_t(j * M + r)]) * double(float(v[size_t(j * stride + d)]));
        sum += prod;
        abs_sum += std::abs(prod);
      }
      bad += !(std::abs(double(out[size_t(r * ld_out + d)]) - sum) <= gamma(n + 2) * abs_sum + 1e-30);
    }
    for (Index d = D; d < ld_out; ++d) touched += out[size_t(r * ld_out + d)] != before[size_t(r * ld_out + d)];
  }
  INFO("rows " << M << ", D " << D << ", keys " << n);
  CHECK(bad == 0);
  CHECK(touched == 0);  // columns past D are not the output's
}

}  // namespace

TEST_CASE("score_tile: every row count in every form matches double dot products", "[microkernels][scores]") {
  constexpr Index L = mk::kLanes<float>;
  for (Index rows = 1; rows <= mk::kMaxRows<float>; ++rows) {
    for (Index D : {L, 3 * L}) {
      for (Index n : {Index(1), Index(5), Index(37)}) check_scores<float>(rows, D, n);
      check_scores<gqa::bfloat16>(rows, D, 29);
      // More keys than a widened chunk (24) where the outer form widens 16-bit and int8 K a chunk at a time.
      check_scores<gqa::half>(rows, D, 3);
      check_scores<gqa::half>(rows, D, 53);
      check_scores<std::int8_t>(rows, D, 53);
    }
    // Whole pairs of packets: bf16 rows are read as split pairs on AVX-512 (mk::kSplitPairs), queries packed to match.
    for (Index D : {2 * L, 8 * L}) check_scores<gqa::bfloat16>(rows, D, 37);
  }
}

// int8_scores.hpp: q . k as exact integer sums of the quantised queries and the stored key bytes, the extremes
// -128 and +-127 included (VNNI flips k's sign bit and takes 128 * sum(q8) back; AVX2 multiplies |k| by q with k's
// sign, whose 16-bit pair sums must not saturate), times the row's scale: bitwise float(sum) * scale.
TEST_CASE("score_tile_i8: exact integer dot products of quantised queries, times their scales", "[microkernels][int8]") {
  if (mk::kI8Lanes == 0) return;  // no integer path on this target: int8_dot_rows is false, the float path runs
  for (Index rows = 1; rows <= mk::kI8Lanes; ++rows)
    for (Index D : {Index(mk::kI8Step), Index(2 * mk::kI8Step), Index(4 * mk::kI8Step)}) {
      if (!mk::int8_dot_rows(rows, D)) continue;
      for (Index n : {Index(1), Index(5), mk::kI8Lanes / rows, Index(37), Index(300)}) {
        const Index stride = D + 3;
        auto k = strided_rows<std::int8_t>(n, D, stride, std::uint64_t(rows * 31 + n));
        for (Index j = 0; j < n; ++j) k[size_t(j * stride + j % D)] = std::int8_t(j % 2 ? -128 : 127);
        gqa_test::Rng rng(std::uint64_t(rows * 7 + D + n));
        const Index padded = mk::int8_padded_rows(rows);
        std::vector<float> q(size_t(rows * D)), scale(static_cast<size_t>(padded)),
            offset(static_cast<size_t>(padded)), st(size_t(n * rows));
        for (auto& x : q) x = float(rng.normal());
        q[0] = -40.0f;  // a row's extreme maps to -127
        std::vector<std::int8_t> q8(size_t(padded * D));
        mk::quantize_queries(q.data(), rows, D, q8.data(), scale.data(), offset.data());
        mk::score_tile_i8({q8.data(), scale.data(), offset.data()}, rows, mk::KVRows<std::int8_t>{k.data(), stride, n, D, n},
                          st.data());
        Index bad = 0;
        for (Index j = 0; j < n; ++j)
          for (Index r = 0; r < rows; ++r) {
            std::int64_t sum = 0;
            for (Index d = 0; d < D; ++d) sum += std::int64_t(q8[size_t(r * D + d)]) * k[size_t(j * stride + d)];
            bad += st[size_t(j * rows + r)] != float(sum) * scale[size_t(r)];
          }
        INFO("rows " << rows << ", D " << D << ", keys " << n);
        CHECK(bad == 0);
        CHECK(q8[0] == -127);
      }
    }
  CHECK(mk::int8_padded_rows(3) == 4);
  CHECK(mk::int8_padded_rows(9) == 16);
  CHECK_FALSE(mk::int8_dot_rows(mk::kI8Lanes + 1, 2 * mk::kI8Step));  // more than a packet: the float path
  CHECK_FALSE(mk::int8_dot_rows(2, mk::kI8Step + 8));                 // nor D not a whole number of steps
}

TEST_CASE("quantize_query_row: scale max|q| / 127, nearest step per element, zero and non-finite rows",
          "[microkernels][int8]") {
  gqa_test::Rng rng(5);
  std::vector<float> q(96);
  std::vector<std::int8_t> q8(96);
  for (auto& x : q) x = float(rng.normal());
  q[17] = 3.5f;
  const float scale = mk::quantize_query_row(q.data(), 96, q8.data());
  CHECK(scale == 3.5f / 127.0f);
  CHECK(q8[17] == 127);
  for (size_t d = 0; d < q.size(); ++d) {
    CHECK(std::abs(q8[d]) <= 127);
    CHECK(std::abs(double(q8[d]) * scale - q[d]) <= 0.5 * scale * (1 + 1e-5));
  }
  std::vector<float> zero(96, 0.0f);
  CHECK(mk::quantize_query_row(zero.data(), 96, q8.data()) == 0.0f);
  CHECK(std::all_of(q8.begin(), q8.end(), [](std::int8_t x) { return x == 0; }));
  q[3] = std::numeric_limits<float>::quiet_NaN();
  CHECK(std::isnan(mk::quantize_query_row(q.data(), 96, q8.data())));
  q[3] = std::numeric_limits<float>::infinity();
  CHECK(std::isnan(mk::quantize_query_row(q.data(), 96, q8.data())));
}

TEST_CASE("score_tile: the form chosen for a row count", "[microkernels][scores]") {
  constexpr Index L = mk::kLanes<float>;
  int dot_rows = 0, dot_packets = 0, outer = 0;
  auto count = [&](auto form) {
    using F = decltype(form);
    if constexpr (std::is_same_v<F, mk::DotRows<1>> || std::is_same_v<F, mk::DotRows<3>>) ++dot_rows;
    if constexpr (std::is_same_v<F, mk::DotRows<L>>) ++dot_packets;
    if constexpr (std::is_same_v<F, mk::OuterPackets<2>> || std::is_same_v<F, mk::OuterPackets<4>>) ++outer;
  };
  mk::with_score_form<float>(1, count);
  mk::with_score_form<float>(3, count);
  mk::with_score_form<float>(L, count);                       // one whole packet: dot form
  int dot_eight = 0;  // 8 rows divide AVX-512's 16 lanes: the dot form, no half-empty packets
  mk::with_score_form<float>(8, [&](auto form) { dot_eight += std::is_same_v<decltype(form), mk::DotRows<8>>; });
  CHECK(dot_eight == (L % 8 == 0 ? 1 : 0));
  mk::with_score_form<float>(2 * L, count);                   // two packets: outer form
  mk::with_score_form<float>(4 * L, count);
  mk::with_score_form<float>(2 * L - 1, count);               // not whole packets: outer form
  CHECK(dot_rows == 2);
  CHECK(dot_packets == 1);
  CHECK(outer == 3);
}

TEST_CASE("accumulate_pv: every row count matches double sums, and writes only the output's columns",
          "[microkernels][pv]") {
  constexpr Index L = mk::kLanes<float>;
  for (Index M = 1; M <= mk::kMaxRows<float>; ++M)
    for (Index D : {L, 8 * L + L}) {  // 9 packets: every column-block tail
      for (Index n : {Index(1), Index(9), Index(70)}) check_pv<float>(M, D, n);
      check_pv<gqa::bfloat16>(M, D, 13);
      // Several chunks, widened once each where more than one block of rows reads them (M > 6).
      check_pv<gqa::half>(M, D, 150);
      check_pv<std::int8_t>(M, D, 150);
    }
}

TEST_CASE("score_tile and accumulate_pv: rows too wide for a widened chunk are read in place", "[microkernels]") {
  constexpr Index L = mk::kLanes<float>;
  const Index D = mk::WidenedChunk<float>::kBytes / Index(sizeof(float)) + L;  // one row exceeds the L1 buffer
  REQUIRE(mk::WidenedChunk<float>::keys_that_fit(24, D) == 0);
  check_scores<gqa::half>(L + 1, D, 30);
  check_scores<gqa::bfloat16>(2 * L, D, 30);
  check_pv<gqa::half>(mk::kPvRows + 1, D, 20);
  check_pv<std::int8_t>(mk::kPvRows + 1, D, 20);
}

TEST_CASE("accumulate_pv: bf16 rows of whole packet pairs (split pairs on AVX-512) match double sums",
          "[microkernels][pv]") {
  constexpr Index L = mk::kLanes<float>;
  for (Index M = 1; M <= mk::kMaxRows<float>; ++M)
    for (Index D : {2 * L, 8 * L, 10 * L}) check_pv<gqa::bfloat16>(M, D, 21);
}

TEST_CASE("The softmax's exp: within 2 ulp over [-87, 0], exact zeros below -87 and at -inf, NaN kept", "[microkernels][exp]") {
  using P = gqa::detail::mk::Packet<float>;
  constexpr int L = gqa::detail::mk::kLanes<float>;
  bool lanes_agree = true;
  auto packet_exp = [&](float v) {
    float in[L], out[L];
    std::fill_n(in, L, v);
    Eigen::internal::pstoreu(out, gqa::detail::mk::pexp_nonpositive(Eigen::internal::ploadu<P>(in)));
    for (int i = 1; i < L; ++i) lanes_agree = lanes_agree && std::memcmp(&out[i], &out[0], sizeof(float)) == 0;
    return out[0];
  };
  // Every 2^16th float from -0 down to -87 (every binade, 128 values in each), then the ends.
  std::uint32_t bits;
  const float start = -0.0f;
  std::memcpy(&bits, &start, sizeof bits);
  for (;; bits += 1u << 16) {
    float v;
    std::memcpy(&v, &bits, sizeof v);
    if (v < -87.0f) break;
    // Cephes' polynomial: 2 ulp of float (2.4e-7), as Eigen's pexp.
    CHECK_THAT(double(packet_exp(v)), Catch::Matchers::WithinRel(std::exp(double(v)), 2.5e-7));
  }
  CHECK(lanes_agree);
  CHECK_THAT(double(packet_exp(-87.0f)), Catch::Matchers::WithinRel(std::exp(-87.0), 2.5e-7));
  CHECK(packet_exp(0.0f) == 1.0f);
  CHECK(packet_exp(-87.01f) == 0.0f);  // below 1.7e-38 against a row sum >= 1
  CHECK(packet_exp(-1e30f) == 0.0f);
  CHECK(packet_exp(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(std::isnan(packet_exp(std::numeric_limits<float>::quiet_NaN())));
}

namespace {

std::uint32_t float_bits(float f) {
  std::uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
float bits_float(std::uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

/// The floats the float -> half tests convert: every 4099th bit pattern (~10^6, all signs and binades), and the
/// hard cases: every half's value, the midpoints between neighbouring halves (ties) and one float ulp either
/// side, the subnormal range and the overflow threshold 65520, infinities and NaNs with payloads.
std::vector<float> half_test_floats() {
  std::vector<float> v;
  for (std::uint64_t b = 0; b <= 0xffffffffull; b += 4099) v.push_back(bits_float(std::uint32_t(b)));
  for (std::uint32_t h = 0; h < 0x7c00; ++h) {
    for (std::uint32_t sign : {0u, 0x8000u}) {
      const double lo = double(mk::half_bits_to_float_portable(std::uint16_t(h | sign)));
      const double hi = double(mk::half_bits_to_float_portable(std::uint16_t((h + 1) | sign)));
      const float mid = float((lo + hi) / 2);  // exact: halves have 11 significant bits
      v.push_back(float(lo));
      v.push_back(mid);
      v.push_back(std::nextafter(mid, 0.0f));
      v.push_back(std::nextafter(mid, 2 * mid));
    }
  }
  for (float f : {0x1.0p-25f, 0x1.0p-24f, 0x1.8p-25f, 0x1.0p-26f, 0x1.0p-14f, 0x1.ffcp-15f, 65504.0f, 65519.99f,
                  65520.0f, 65536.0f, 1e30f, std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::infinity()}) {
    v.push_back(f);
    v.push_back(-f);
    v.push_back(std::nextafter(f, 0.0f));
    v.push_back(std::nextafter(f, 2 * f));
  }
  for (std::uint32_t nan : {0x7fc00000u, 0x7f800001u, 0x7fa00000u, 0x7fffe000u, 0x7f802000u, 0xffc12345u, 0xff800001u})
    v.push_back(bits_float(nan));
  return v;
}

}  // namespace

TEST_CASE("half -> float: the hardware widening and the portable one agree bit for bit on every half",
          "[microkernels][half]") {
  Index bad_scalar = 0, bad_packet = 0, bad_value = 0;
  std::vector<gqa::half> all(0x10000);
  for (std::uint32_t h = 0; h < 0x10000; ++h) all[h] = mk::half_from_bits(std::uint16_t(h));
  std::vector<float> widened(all.size());
  mk::widen_row(all.data(), widened.data(), Index(all.size()));  // packets of F16C / AVX-512 where built with them
  for (std::uint32_t h = 0; h < 0x10000; ++h) {
    const float portable = mk::half_bits_to_float_portable(std::uint16_t(h));
    bad_scalar += float_bits(mk::widen<float>(all[h])) != float_bits(portable);
    bad_packet += float_bits(widened[h]) != float_bits(portable);
    // An independent check of the value: sign * mantissa * 2^exponent, in double.
    const int exp = int(h >> 10) & 0x1f, mant = int(h & 0x3ff);
    const double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exp == 0x1f) {
      bad_value += mant ? !std::isnan(portable) : portable != float(sign * HUGE_VAL);
    } else {
      const double value = exp == 0 ? sign * mant * 0x1.0p-24 : sign * (1024 + mant) * std::ldexp(1.0, exp - 25);
      bad_value += double(portable) != value || std::signbit(portable) != (sign < 0);
    }
  }
  CHECK(bad_scalar == 0);
  CHECK(bad_packet == 0);
  CHECK(bad_value == 0);
}

TEST_CASE("float -> half: the hardware narrowing and the portable one agree bit for bit, rounding to nearest even",
          "[microkernels][half]") {
  const std::vector<float> in = half_test_floats();
  std::vector<gqa::half> row(in.size());
  mk::narrow_to_half(in.data(), row.data(), Index(in.size()));  // 16 / 8 at a time where built with AVX-512 / F16C
  Index bad_scalar = 0, bad_row = 0, bad_nearest = 0, nans = 0;
  for (size_t i = 0; i < in.size(); ++i) {
    const std::uint16_t portable = mk::float_to_half_bits_portable(in[i]);
    bad_scalar += mk::half_bits(mk::narrow_to_half(in[i])) != portable;
    bad_row += mk::half_bits(row[i]) != portable;
    if (std::isnan(in[i])) {
      nans += 1;
      bad_nearest += (portable & 0x7e00) != 0x7e00;  // a quiet NaN
      continue;
    }
    // Independently: the result is a nearest half, and on a tie the even one; beyond 65520 inf.
    const double x = in[i], r = mk::half_bits_to_float_portable(portable);
    if (std::abs(x) >= 65520.0) {
      bad_nearest += !(std::isinf(r) && std::signbit(r) == std::signbit(x));
      continue;
    }
    const std::uint16_t mag = portable & 0x7fff;
    const double up = mk::half_bits_to_float_portable(std::uint16_t(portable + 1));
    const double down = mag == 0 ? -double(mk::half_bits_to_float_portable(std::uint16_t(portable ^ 0x0001)))
                                 : double(mk::half_bits_to_float_portable(std::uint16_t(portable - 1)));
    const double err = std::abs(x - r);
    const bool nearest = err <= std::abs(x - up) && err <= std::abs(x - down);
    const bool tie_even = !(err == std::abs(x - up) || err == std::abs(x - down)) || (portable & 1) == 0;
    bad_nearest += !(nearest && tie_even && std::signbit(r) == std::signbit(x));
  }
  INFO(in.size() << " floats, " << nans << " NaNs");
  CHECK(bad_scalar == 0);
  CHECK(bad_row == 0);
  CHECK(bad_nearest == 0);
}
