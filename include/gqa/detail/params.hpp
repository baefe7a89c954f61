// gqa/detail/params.hpp — the one params struct every attention kernel runs on, and the validation that fills it.
//
// make_params() is the only place shapes and options are checked; kernels trust what it returns (debug asserts
// only). Strides are in elements; the head_dim (D) stride is always 1.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace gqa {
namespace detail {

/// The per-row scales of a quantised (int8) K and V, as a KVCache<std::int8_t> keeps them: [B, G, rows] floats,
/// the row (token) index contiguous; scale of (b, s, g) at k[b * stride_b + g * stride_h + s].
struct KVScales {
  const float* k = nullptr;
  const float* v = nullptr;
  Index batch = 0, heads = 0, rows = 0;  // B, G, capacity
  Index stride_b = 0, stride_h = 0;
};

/// Paged K/V (gqa::PagedKVCache): per KV head a pool of blocks of block_size rows ([G, blocks, block_size, D]), and
/// one block table per sequence. Key j of sequence b, KV head g, is row j % block_size of block
/// table[b * table_stride + j / block_size]: at k + g * k_stride_h + block * block_stride + (j % block_size) *
/// k_stride_s (likewise v); an int8 pool's scale of it at k_scale + g * scale_stride_h + block * scale_block_stride +
/// j % block_size. The table of b lists at least ceil(keys_of(b) / block_size) valid blocks (set_paged checks).
struct PagedKV {
  const std::int32_t* table = nullptr;  // [B, table_stride] block ids
  Index table_stride = 0;
  Index block_size = 0;
  Index blocks = 0;              // blocks in the pool
  Index block_stride = 0;        // elements from one block of a head to the next: block_size * D
  Index scale_block_stride = 0;  // int8: floats from one block's scales of a head to the next: block_size
};

template <typename T, typename KVT>
struct AttentionParams {
  using Scalar = std::remove_const_t<T>;     // Q and output storage
  using KVScalar = std::remove_const_t<KVT>;  // K and V storage
  using Acc = std::conditional_t<std::is_same_v<Scalar, double> || std::is_same_v<KVScalar, double>, double, float>;

  const Scalar* q = nullptr;  // [B, Sq, H, D]
  const KVScalar* k = nullptr;  // [B, Sk, G, D] via strides
  const KVScalar* v = nullptr;  // [B, Sk, G, D] via strides
  Scalar* o = nullptr;          // [B, Sq, H, D]
  // int8 K/V only: element (b, s, g, d) means k[...] * k_scale[b * scale_stride_b + g * scale_stride_h + s]
  // (likewise v); the kernels apply the K scale to the score and the V scale to the probability.
  const float* k_scale = nullptr;
  const float* v_scale = nullptr;
  Index scale_stride_b = 0, scale_stride_h = 0;

  Index batch = 0;       // B
  Index q_len = 0;       // Sq
  Index k_len = 0;       // Sk
  Index heads = 0;       // H, query heads
  Index kv_heads = 0;    // G, key/value heads = groups
  Index group_size = 0;  // H / G, query heads per KV head
  Index head_dim = 0;    // D

  Index q_stride_b = 0, q_stride_s = 0, q_stride_h = 0;
  Index k_stride_b = 0, k_stride_s = 0, k_stride_h = 0;
  Index v_stride_b = 0, v_stride_s = 0, v_stride_h = 0;
  Index o_stride_b = 0, o_stride_s = 0, o_stride_h = 0;

  double scale = 1.0;
  double softcap = 0.0;  // 0 = off
  bool causal = false;   // also true when window > 0 (a window implies the causal bound)
  Index window = 0;      // 0 = none

  // Bias element (b, h, i, j) at b*bias_stride_b + h*bias_stride_h + i*bias_stride_q + j (stride 0: broadcast);
  // at most one of the two pointers is set.
  const float* bias_float = nullptr;
  const double* bias_double = nullptr;
  Index bias_stride_b = 0, bias_stride_h = 0, bias_stride_q = 0;

  const std::int32_t* key_lengths32 = nullptr;  // [B], or null
  const std::int64_t* key_lengths64 = nullptr;  // [B], or null (both null: every sequence has Sk keys)
  float* lse = nullptr;                         // [B, H, Sq] or null
  const float* sinks = nullptr;                 // [H] extra softmax logit per query head (no value), or null
  const float* alibi = nullptr;                 // [H] ALiBi slopes: + slope[h] * (j - p) on the logits, or null
  PagedKV paged;                                // table null: K/V are the strided tensors above

  int num_threads = 1;

  bool has_bias() const noexcept { return bias_float != nullptr || bias_double != nullptr; }
  bool is_paged() const noexcept { return paged.table != nullptr; }
  /// Absolute position of query i of sequence b (bottom-right aligned, as the masks): ALiBi's p.
  Index position_of(Index b, Index i) const noexcept { return i + keys_of(b) - q_len; }
  /// Number of valid keys of sequence b.
  Index keys_of(Index b) const noexcept {
    return key_lengths32 ? Index(key_lengths32[b]) : key_lengths64 ? Index(key_lengths64[b]) : k_len;
  }
};

inline void check_ref_basics(const char* name, const std::array<Index, 4>& dims, const std::array<Index, 4>& strides,
                             const void* data) {
  static const char* dim_names[4] = {"batch B", "sequence S", "heads", "head_dim D"};
  for (int i = 0; i < 4; ++i)
    require<shape_error>(dims[i] >= 0, "shape", name, ": dim ", i, " (", dim_names[i], ") = ", dims[i],
                         " is negative");
  require<shape_error>(strides[3] == 1, "stride", name, ": head_dim stride = ", strides[3],
                       " but D must be contiguous (stride 1)");
  const bool empty = dims[0] * dims[1] * dims[2] * dims[3] == 0;
  require(empty || data != nullptr, "null", name, ": data pointer is null for a non-empty tensor");
}

/// Bytes [lo, hi) spanned by a strided view of `elem` bytes per element (empty when a dim is 0).
struct ByteRange {
  const char* lo = nullptr;
  const char* hi = nullptr;

  bool overlaps(const ByteRange& o) const noexcept { return lo < hi && o.lo < o.hi && lo < o.hi && o.lo < hi; }
};

inline ByteRange byte_range(const void* data, const std::array<Index, 4>& dims, const std::array<Index, 4>& strides,
                            Index elem) {
  const char* base = static_cast<const char*>(data);
  for (int i = 0; i < 4; ++i)
    if (dims[i] == 0) return {base, base};
  Index lo = 0, hi = 0;  // element offsets of the first and last elements reached
  for (int i = 0; i < 4; ++i) (strides[i] < 0 ? lo : hi) += (dims[i] - 1) * strides[i];
  return {base + lo * elem, base + (hi + 1) * elem};
}

/// Refuses an `out` whose memory overlaps an input's: the kernels read k, v, the bias and other items' queries after
/// writing some outputs. out == q exactly (same data and strides) is fine: every query row is read, by the one
/// item that writes its output, before it is written.
template <typename T, typename KVT>
void check_no_overlap(TensorRef<const T> q, TensorRef<const KVT> k, TensorRef<const KVT> v, TensorRef<T> out,
                      const AttentionOptions& opt) {
  const ByteRange o = byte_range(out.data, out.dims, out.strides, sizeof(T));
  auto refuse_overlap = [&](const ByteRange& r, const char* what) {
    require(!o.overlaps(r), "alias", "out overlaps ", what,
            " in memory; out must be a separate buffer, or q itself (the same data and strides)");
  };
  refuse_overlap(byte_range(k.data, k.dims, k.strides, sizeof(KVT)), "k");
  refuse_overlap(byte_range(v.data, v.dims, v.strides, sizeof(KVT)), "v");
  const bool same_as_q = static_cast<const void*>(out.data) == static_cast<const void*>(q.data) &&
                         out.strides == q.strides;
  if (!same_as_q) refuse_overlap(byte_range(q.data, q.dims, q.strides, sizeof(T)), "q");
  const BiasView& bias = opt.bias;
  if (!bias.empty()) {
    const void* data = bias.float_data() ? static_cast<const void*>(bias.float_data()) : bias.double_data();
    refuse_overlap(byte_range(data, bias.dims(), bias.strides(), bias.float_data() ? 4 : 8), "options.bias");
  }
  refuse_overlap(byte_range(opt.lse.data(), {opt.lse.size(), 1, 1, 1}, {1, 1, 1, 1}, sizeof(float)), "options.lse");
  refuse_overlap(byte_range(opt.sinks.data(), {opt.sinks.size(), 1, 1, 1}, {1, 1, 1, 1}, sizeof(float)),
                 "options.sinks");
  refuse_overlap(byte_range(opt.alibi_slopes.data(), {opt.alibi_slopes.size(), 1, 1, 1}, {1, 1, 1, 1}, sizeof(float)),
                 "options.alibi_slopes");
}

/// Checks the bias against p's shapes and stores it with broadcast (stride 0) batch and head dims.
template <typename Params>
void set_bias(Params& p, const BiasView& bias) {
  const auto& bd = bias.dims();
  const auto& bs = bias.strides();
  const Index B = p.batch, H = p.heads, Sq = p.q_len, Sk = p.k_len;
  require<shape_error>(bd[0] == 1 || bd[0] == B, "shape", "options.bias: dim 0 (batch) = ", bd[0],
                       " must be 1 or B = ", B);
  require<shape_error>(bd[1] == 1 || bd[1] == H, "shape", "options.bias: dim 1 (heads) = ", bd[1],
                       " must be 1 or H = ", H);
  require<shape_error>(bd[2] == Sq, "shape", "options.bias: dim 2 (query length) = ", bd[2], " but Sq = ", Sq);
  require<shape_error>(bd[3] == Sk, "shape", "options.bias: dim 3 (key length) = ", bd[3], " but Sk = ", Sk);
  require<shape_error>(bs[3] == 1 || Sk <= 1, "stride", "options.bias: dim 3 (key) stride = ", bs[3],
                       " but the keys of a row must be contiguous (stride 1)");
  p.bias_float = bias.float_data();
  p.bias_double = bias.double_data();
  p.bias_stride_q = bs[2];
  p.bias_stride_h = bd[1] == 1 ? 0 : bs[1];
  p.bias_stride_b = bd[0] == 1 ? 0 : bs[0];
}

/// Checks a per-head option (options.sinks, options.alibi_slopes): H values, none NaN, none +inf, and -inf only
/// where `neg_inf_ok`; returns its data, or null when it is empty.
inline const float* per_head_option(const char* name, span<const float> values, Index heads, bool neg_inf_ok) {
  if (values.empty() && values.data() == nullptr) return nullptr;
  require<shape_error>(values.size() == heads, "shape", name, ": size = ", values.size(), " but H = ", heads,
                       " (one value per query head)");
  require(heads == 0 || values.data() != nullptr, "null", name, ": data pointer is null");
  for (Index h = 0; h < heads; ++h) {
    const float x = values[h];
    const bool ok = std::isfinite(x) || (neg_inf_ok && x == -std::numeric_limits<float>::infinity());
    require(ok, "option", name, "[", h, "] = ", x, neg_inf_ok ? " must be finite or -inf (no sink)" : " must be finite");
  }
  return values.data();
}

/// Checks the scales of an int8 K/V against its shape [B, Sk, G, D] and stores them in p.
template <typename Params>
void set_kv_scales(Params& p, const KVScales* scales) {
  require(scales != nullptr && scales->k != nullptr && scales->v != nullptr, "null",
          "int8 k/v: no per-row scales (attend to the gqa::KVCache<std::int8_t>, which holds them)");
  require<shape_error>(scales->batch == p.batch && scales->heads == p.kv_heads && scales->rows >= p.k_len, "shape",
                       "int8 k/v scales: [", scales->batch, ", ", scales->heads, ", ", scales->rows,
                       "] do not cover k's [B = ", p.batch, ", G = ", p.kv_heads, ", Sk = ", p.k_len, "]");
  p.k_scale = scales->k;
  p.v_scale = scales->v;
  p.scale_stride_b = scales->stride_b;
  p.scale_stride_h = scales->stride_h;
}

/// Validates q/k/v/out and options and returns the params the kernels run on. `scales`: the per-row scales of an
/// int8 k/v (required then, null otherwise).
/// Throws shape_error / invalid_argument naming the argument, dimension and values.
template <typename T, typename KVT>
AttentionParams<T, KVT> make_params(TensorRef<const T> q, TensorRef<const KVT> k, TensorRef<const KVT> v,
                                    TensorRef<T> out, const AttentionOptions& opt,
                                    const KVScales* scales = nullptr) {
  check_ref_basics("q", q.dims, q.strides, q.data);
  check_ref_basics("k", k.dims, k.strides, k.data);
  check_ref_basics("v", v.dims, v.strides, v.data);
  check_ref_basics("out", out.dims, out.strides, out.data);

  const Index B = q.dims[0], Sq = q.dims[1], H = q.dims[2], D = q.dims[3];
  const Index Sk = k.dims[1], G = k.dims[2];
  require<shape_error>(H > 0, "shape", "q: dim 2 (heads H) = ", H, " must be positive");
  require<shape_error>(D > 0, "shape", "q: dim 3 (head_dim D) = ", D, " must be positive");
  require<shape_error>(G > 0, "shape", "k: dim 2 (kv_heads G) = ", G, " must be positive");
  require<shape_error>(H % G == 0, "shape", "k: dim 2 (kv_heads G) = ", G, " does not divide q dim 2 (heads H) = ", H);
  require<shape_error>(k.dims[0] == B, "shape", "k: dim 0 (batch B) = ", k.dims[0], " but q dim 0 = ", B);
  require<shape_error>(k.dims[3] == D, "shape", "k: dim 3 (head_dim D) = ", k.dims[3], " but q dim 3 = ", D);
  for (int i = 0; i < 4; ++i)
    require<shape_error>(v.dims[i] == k.dims[i], "shape", "v: dim ", i, " = ", v.dims[i], " but k dim ", i, " = ",
                         k.dims[i], " (v must have k's shape [B, Sk, G, D])");
  for (int i = 0; i < 4; ++i)
    require<shape_error>(out.dims[i] == q.dims[i], "shape", "out: dim ", i, " = ", out.dims[i], " but q dim ", i,
                         " = ", q.dims[i], " (out must have q's shape [B, Sq, H, D])");

  require(opt.window >= 0, "option", "options.window = ", opt.window, " must be >= 0 (0 = no window)");
  require(std::isfinite(opt.softcap) && opt.softcap >= 0, "option", "options.softcap = ", opt.softcap,
          " must be finite and >= 0 (0 = off)");
  if (opt.scale)
    require(std::isfinite(*opt.scale), "option", "options.scale = ", *opt.scale, " must be finite");
  require(opt.num_threads >= 0, "option", "options.num_threads = ", opt.num_threads, " must be >= 0 (0 = default)");

  AttentionParams<T, KVT> p;
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  p.o = out.data;
  p.batch = B;
  p.q_len = Sq;
  p.k_len = Sk;
  p.heads = H;
  p.kv_heads = G;
  p.group_size = H / G;
  p.head_dim = D;
  p.q_stride_b = q.strides[0], p.q_stride_s = q.strides[1], p.q_stride_h = q.strides[2];
  p.k_stride_b = k.strides[0], p.k_stride_s = k.strides[1], p.k_stride_h = k.strides[2];
  p.v_stride_b = v.strides[0], p.v_stride_s = v.strides[1], p.v_stride_h = v.strides[2];
  p.o_stride_b = out.strides[0], p.o_stride_s = out.strides[1], p.o_stride_h = out.strides[2];
  p.scale = opt.scale ? *opt.scale : 1.0 / std::sqrt(double(D));
  p.softcap = opt.softcap;
  p.window = opt.window;
  p.causal = opt.causal || opt.window > 0;

  if constexpr (std::is_same_v<std::remove_const_t<KVT>, std::int8_t>) set_kv_scales(p, scales);
  GQA_ASSERT((std::is_same_v<std::remove_const_t<KVT>, std::int8_t>) || scales == nullptr);
  (void)scales;
  if (!opt.bias.empty()) set_bias(p, opt.bias);
  if (opt.key_lengths.given()) {
    const KeyLengths& len = opt.key_lengths;
    require<shape_error>(len.size() == B, "shape", "options.key_lengths: size = ", len.size(), " but B = ", B);
    require(B == 0 || len.int32_data() || len.int64_data(), "null", "options.key_lengths: data pointer is null");
    for (Index b = 0; b < B; ++b)
      require(len[b] >= 0 && len[b] <= Sk, "option", "options.key_lengths[", b, "] = ", len[b],
              " must be in [0, Sk = ", Sk, "]");
    p.key_lengths32 = len.int32_data();
    p.key_lengths64 = len.int64_data();
  }
  if (!opt.lse.empty() || opt.lse.data() != nullptr) {
    require<shape_error>(opt.lse.size() == B * H * Sq, "shape", "options.lse: size = ", opt.lse.size(),
                         " but B*H*Sq = ", B * H * Sq);
    p.lse = opt.lse.data();
  }
  p.sinks = per_head_option("options.sinks", opt.sinks, H, true);
  if (p.sinks && p.lse)  // the kernels write lse rows while later rows still read their head's sink
    require(!byte_range(p.lse, {opt.lse.size(), 1, 1, 1}, {1, 1, 1, 1}, sizeof(float))
                 .overlaps(byte_range(p.sinks, {H, 1, 1, 1}, {1, 1, 1, 1}, sizeof(float))),
            "alias", "options.lse overlaps options.sinks in memory; lse must be a separate buffer");
  p.alibi = per_head_option("options.alibi_slopes", opt.alibi_slopes, H, false);
  check_no_overlap(q, k, v, out, opt);
  p.num_threads = opt.num_threads;
  return p;
}

/// Attaches a paged K/V to params made from k, v views of its pools ([B, Sk, G, D] with strides {0, D,
/// blocks * block_size * D, 1}: one block's rows of each head): checks that every sequence's table holds valid block ids for its
/// keys and that out does not overlap either pool. The cache builds the tables, so a failure here is a gqa bug, but
/// the check is cheap next to the attention and turns one into an error rather than a read out of bounds.
template <typename T, typename KVT>
void set_paged(AttentionParams<T, KVT>& p, const PagedKV& paged, TensorRef<T> out) {
  using KVScalar = std::remove_const_t<KVT>;
  require(paged.block_size > 0 && paged.table != nullptr, "null", "paged K/V: no block table");
  for (Index b = 0; b < p.batch; ++b) {
    const Index need = (p.keys_of(b) + paged.block_size - 1) / paged.block_size;
    require<shape_error>(need <= paged.table_stride, "shape", "paged K/V: sequence ", b, " holds ", p.keys_of(b),
                         " keys, ", need, " blocks, but its table has ", paged.table_stride);
    for (Index i = 0; i < need; ++i) {
      const Index block = paged.table[b * paged.table_stride + i];
      require(block >= 0 && block < paged.blocks, "option", "paged K/V: sequence ", b, " block ", i, " = ", block,
              " not in [0, ", paged.blocks, ")");
    }
  }
  const ByteRange o = byte_range(out.data, out.dims, out.strides, sizeof(T));
  const Index pool_bytes = p.kv_heads * paged.blocks * paged.block_stride * Index(sizeof(KVScalar));
  const auto* k = reinterpret_cast<const char*>(p.k);
  const auto* v = reinterpret_cast<const char*>(p.v);
  require(!o.overlaps({k, k + pool_bytes}), "alias", "out overlaps the paged K pool in memory");
  require(!o.overlaps({v, v + pool_bytes}), "alias", "out overlaps the paged V pool in memory");
  p.paged = paged;
}

}  // namespace detail
}  // namespace gqa
