// gqa/attention_backward.hpp — gradients of gqa::attention (MHA / GQA / MQA) for training.
//
//   q, d_q            [B, Sq, H, D]   queries and their gradient
//   k, v, d_k, d_v    [B, Sk, G, D]   keys, values and their gradients (or head-major [B, G, Sk, D])
//   out, d_out        [B, Sq, H, D]   the forward's output and the loss gradient with respect to it
//   d_bias            [B, H, Sq, Sk]  optional: gradient of a non-broadcast options.bias (or of the logits' bias
//                                     term when there is no bias), contiguous
//   d_sinks           [H]             optional: gradient of options.sinks (which must be given then)
//
// attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, options) takes the forward's inputs, output and options
// and overwrites d_q, d_k, d_v. Each KV head's d_k / d_v is the sum over the H/G query heads of its group (the
// gradient of the shared head, what a repeat_kv model's autograd gives). Every forward option is honoured: scale,
// causal (bottom-right), window, soft-cap (through tanh), additive bias, key lengths; gradients of padded keys and
// of keys no query sees are exact zeros, and so are those of a query row with no visible key (never NaN).
// Sinks: options.lse, given or recomputed, includes them (so P = exp(Z - lse) are the forward's weights) and
// Delta_i = dO_i . O_i still holds (the sink has no value); d_sinks[h] = -sum over rows (b, i) of head h of
// exp(sinks[h] - lse) * Delta (0 from rows with no visible key, and for a -inf sink), summed in a fixed order.
// ALiBi slopes are constants (fixed in every model that uses them): no gradient.
// Non-finite inputs follow the forward's rule (gqa/options.hpp): a masked pair (padding, causal, window, a -inf bias
// entry) contributes nothing even where K, V, Q or d_out hold NaN or inf; a NaN or inf among visible pairs goes
// where the formulas carry it (a NaN key makes the rows that see it NaN in d_q, and the d_k / d_v of every key
// those rows see), as autograd of the naive formula does.
//
// options.lse: pass the span the forward filled (B*H*Sq floats) to save the pass that recomputes it; when empty the
// backward recomputes it. With double arithmetic a float lse would cap the gradients at float accuracy, so it is
// then always recomputed in double (the span is still validated).
//
// Implementation: flash-style (gqa/detail/flash_bwd.hpp). P is recomputed tile by tile from the lse and the tile
// products are Eigen GEMMs; nothing Sq x Sk is allocated. Memory: O(tile) per thread, plus Acc accumulators for
// d_k / d_v where they cannot be summed in place: one KV head per thread for 16-bit d_k / d_v, and, when B*G < 8
// (so that a few KV heads still feed every thread), one copy per query chunk, at most 256 MiB in all. Results are
// bitwise identical for every options.num_threads (each KV head's d_k / d_v is reduced in a fixed order, no
// atomics).
//
// Element types as the forward: q, out, d_out, d_q share one type, k, v, d_k, d_v another (float, double, bfloat16,
// half); arithmetic in float, double if either is double. Gradient tensors must not overlap the inputs.
// Errors: the forward's checks (gqa::shape_error / gqa::invalid_argument, same ids and messages) plus those of the
// gradient tensors, all thrown before anything is written.
#pragma once

#include "gqa/attention.hpp"
#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/flash_bwd.hpp"
#include "gqa/options.hpp"
#include "gqa/types.hpp"

namespace gqa {

/// Gradients of attention(q, k, v, options) = out given d_out; writes d_q, d_k, d_v and, when given, d_bias and
/// d_sinks.
/// Tensors: gqa::Tensor4, Eigen::TensorMap or gqa::TensorRef; head-major k, v, d_k, d_v through gqa::head_major().
template <typename Q, typename K, typename V, typename O, typename DO, typename DQ, typename DK, typename DV>
void attention_backward(const Q& q, const K& k, const V& v, const O& out, const DO& d_out, DQ&& d_q, DK&& d_k,
                        DV&& d_v, const AttentionOptions& options = {}, span<float> d_bias = {},
                        span<float> d_sinks = {}) {
  const auto in = detail::input_refs(q, k, v);
  using T = detail::ref_elem_t<decltype(in.q)>;
  using KVT = detail::ref_elem_t<decltype(in.k)>;
  const auto p = detail::make_backward_params<T, KVT>(
      in.q, in.k, in.v, detail::input_ref<T>(out), detail::input_ref<T>(d_out), detail::output_ref<T>(d_q),
      detail::output_ref<KVT>(d_k), detail::output_ref<KVT>(d_v), options, d_bias, d_sinks);
  detail::flash_attention_backward(p);
}

/// The gradients of one call, as new tensors: d_q of q's element type, d_k and d_v of k's, in q's / k's logical
/// shape ([B, Sk, G, D], token-major even when k is a gqa::head_major() view).
template <typename T, typename KVT>
struct AttentionGradients {
  Tensor4<T> d_q;    // [B, Sq, H, D]
  Tensor4<KVT> d_k;  // [B, Sk, G, D]
  Tensor4<KVT> d_v;  // [B, Sk, G, D]
};

/// attention_backward returning new gradient tensors (token-major).
template <typename Q, typename K, typename V, typename O, typename DO>
auto attention_backward(const Q& q, const K& k, const V& v, const O& out, const DO& d_out,
                        const AttentionOptions& options = {}) {
  const auto qr = detail::as_ref(q);
  const auto kr = detail::as_ref(k);
  using T = detail::ref_elem_t<decltype(qr)>;
  using KVT = detail::ref_elem_t<decltype(kr)>;
  AttentionGradients<T, KVT> g{Tensor4<T>(qr.dims[0], qr.dims[1], qr.dims[2], qr.dims[3]),
                               Tensor4<KVT>(kr.dims[0], kr.dims[1], kr.dims[2], kr.dims[3]),
                               Tensor4<KVT>(kr.dims[0], kr.dims[1], kr.dims[2], kr.dims[3])};
  attention_backward(q, k, v, out, d_out, make_ref(g.d_q), make_ref(g.d_k), make_ref(g.d_v), options);
  return g;
}

}  // namespace gqa
