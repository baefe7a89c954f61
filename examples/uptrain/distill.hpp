// examples/uptrain/distill.hpp — the math of gqa-uptrain: one attention layer's K and V projections trained so that
// its output after o_proj matches a target (layer-wise distillation), with gqa::attention forward and
// gqa::attention_backward for the gradient.
//
// Offers (namespace uptrain):
//   Rope<T>              Hugging Face's rotary embedding (rotate_half) for positions 0 .. S-1, and its transpose
//   KVWeights<T>         the trainable parameters: W_k, W_v [G*D, hidden], b_k, b_v [G*D] (biases optional)
//   LayerProblem<T>      one layer's fixed data: normed inputs X [N*S, hidden], rotated queries Q [N*S, H*D], target
//                        Y [N*S, hidden], o_proj W_o [hidden, H*D]; N windows of S tokens, each at positions 0..S-1
//   window_loss()        sum over one window of (out - y)^2, and optionally its gradient with respect to KVWeights
//   batch_loss()         mean squared error over a list of windows (threads over windows) and its gradient
//   Adam                 the optimizer, on KVWeights
//
// Gradient path of one window (S tokens, all shapes row-major):
//   K = rope(X W_k^T + b_k) [S, G*D], V = X W_v^T + b_v [S, G*D], A = attention(Q, K, V, causal) [S, H*D],
//   out = A W_o^T [S, hidden], loss = sum (out - Y)^2
//   d_out = 2 (out - Y);  d_A = d_out W_o;  (d_K, d_V) = gqa::attention_backward (d_K, d_V summed per group);
//   d_K <- rope^T(d_K) (the rotation's transpose: the inverse rotation);  dW_k = d_K^T X, db_k = sum_rows d_K; same for V.
//
// Determinism: every window is computed on one thread (Eigen products inside an OpenMP region and gqa calls with
// num_threads = 1 run single-threaded), its gradient goes to its own buffer, and the buffers are summed in window
// order, so a step gives bitwise the same result for every thread count.
//
// T is float for training and double for the finite-difference tests; the data (LayerProblem) is T as well.
#pragma once

#include <gqa/attention.hpp>
#include <gqa/attention_backward.hpp>

#include <Eigen/Core>
#include <omp.h>

#include <cassert>
#include <cmath>
#include <vector>

namespace uptrain {

using gqa::Index;
template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using RowVec = Eigen::Matrix<T, 1, Eigen::Dynamic>;

/// Rotary embedding tables for positions 0 .. S-1. cos/sin are computed in double and rounded to T, as the
/// decoder (llama::Model::rope) does, so a rotated float K equals the decoder's bit for bit.
template <typename T>
class Rope {
 public:
  Rope() = default;
  Rope(const std::vector<double>& inv_freq, Index positions) : half_(Index(inv_freq.size())) {
    cos_.resize(positions, half_);
    sin_.resize(positions, half_);
    for (Index s = 0; s < positions; ++s)
      for (Index i = 0; i < half_; ++i) {
        const double angle = double(s) * inv_freq[size_t(i)];
        cos_(s, i) = T(std::cos(angle));
        sin_(s, i) = T(std::sin(angle));
      }
  }
  Index positions() const { return cos_.rows(); }

  /// Rotates each head of t's rows (row s at position s): forward, or by the transpose (inverse = true), which is
  /// the rotation's adjoint: what a gradient with respect to the rotated tensor needs.
  void apply(Mat<T>& t, Index heads, bool inverse = false) const {
    assert(t.rows() <= positions() && t.cols() == heads * 2 * half_);
    const Index D = 2 * half_;
    for (Index s = 0; s < t.rows(); ++s)
      for (Index h = 0; h < heads; ++h) {
        T* x = t.row(s).data() + h * D;
        for (Index i = 0; i < half_; ++i) {
          const T c = cos_(s, i), n = inverse ? -sin_(s, i) : sin_(s, i);
          const T a = x[i], b = x[i + half_];
          x[i] = a * c - b * n;
          x[i + half_] = b * c + a * n;
        }
      }
  }

 private:
  Index half_ = 0;
  Mat<T> cos_, sin_;
};

/// The trainable parameters of one layer (or their gradients): W_k, W_v [G*D, hidden]; b_k, b_v [G*D] when the
/// checkpoint has K/V biases (empty otherwise).
template <typename T>
struct KVWeights {
  Mat<T> wk, wv;
  RowVec<T> bk, bv;

  bool has_bias() const { return bk.size() != 0; }
  /// Zeros of the same shapes.
  KVWeights zeros_like() const {
    KVWeights z;
    z.wk = Mat<T>::Zero(wk.rows(), wk.cols());
    z.wv = Mat<T>::Zero(wv.rows(), wv.cols());
    z.bk = RowVec<T>::Zero(bk.size());
    z.bv = RowVec<T>::Zero(bv.size());
    return z;
  }
  void add(const KVWeights& o) {
    wk += o.wk;
    wv += o.wv;
    bk += o.bk;
    bv += o.bv;
  }
  void scale(T s) {
    wk *= s;
    wv *= s;
    bk *= s;
    bv *= s;
  }
};

/// One layer's fixed data for N windows of S tokens (see the header comment).
template <typename T>
struct LayerProblem {
  Index window = 0;                   ///< S
  Index heads = 0, kv_heads = 0, head_dim = 0;
  Index sliding_window = 0;           ///< gqa::AttentionOptions::window (0: none)
  Mat<T> x;                           ///< [N*S, hidden] the layer's input after input_layernorm
  Mat<T> q;                           ///< [N*S, H*D] queries, bias added and rotated
  Mat<T> y;                           ///< [N*S, hidden] the target: the original layer's attention output after o_proj
  Mat<T> wo;                          ///< [hidden, H*D] o_proj (o_proj's bias, if any, cancels in out - y)
  const Rope<T>* rope = nullptr;

  Index windows() const { return window ? x.rows() / window : 0; }
  Index hidden() const { return x.cols(); }
};

/// Keeps a parameter out of template argument deduction (std::type_identity, C++20), so nullptr can be passed.
template <typename T>
struct NoDeduce {
  using type = T;
};

/// Attention options of the layer: causal, the config's sliding window, one thread (the caller threads windows).
inline gqa::AttentionOptions layer_attention_options(Index sliding_window) {
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.window = sliding_window;
  opt.num_threads = 1;
  return opt;
}

/// Sum over window w of (out - y)^2 with weights `p`; when `grad` is given, overwrites it with the gradient of that
/// sum (same shapes as p).
template <typename T>
double window_loss(const LayerProblem<T>& prob, const KVWeights<T>& p, Index w,
                   typename NoDeduce<KVWeights<T>>::type* grad = nullptr) {
  const Index S = prob.window, H = prob.heads, G = prob.kv_heads, D = prob.head_dim;
  const auto X = prob.x.middleRows(w * S, S);
  const auto Q = prob.q.middleRows(w * S, S);
  Mat<T> K = X * p.wk.transpose(), V = X * p.wv.transpose();
  if (p.has_bias()) {
    K.rowwise() += p.bk;
    V.rowwise() += p.bv;
  }
  prob.rope->apply(K, G);
  Mat<T> A(S, H * D);
  std::vector<float> lse(size_t(H * S));
  gqa::AttentionOptions opt = layer_attention_options(prob.sliding_window);
  opt.lse = gqa::span<float>(lse.data(), H * S);
  const auto q_ref = gqa::token_major<const T>(Q.data(), 1, S, H, D);
  const auto k_ref = gqa::token_major<const T>(K.data(), 1, S, G, D);
  const auto v_ref = gqa::token_major<const T>(V.data(), 1, S, G, D);
  gqa::attention(q_ref, k_ref, v_ref, gqa::token_major(A.data(), 1, S, H, D), opt);
  const Mat<T> diff = A * prob.wo.transpose() - prob.y.middleRows(w * S, S);
  const double loss = diff.template cast<double>().squaredNorm();
  if (!grad) return loss;

  const Mat<T> dA = T(2) * diff * prob.wo;  // [S, H*D]
  Mat<T> dQ(S, H * D), dK(S, G * D), dV(S, G * D);
  gqa::attention_backward(q_ref, k_ref, v_ref, gqa::token_major<const T>(A.data(), 1, S, H, D),
                          gqa::token_major<const T>(dA.data(), 1, S, H, D), gqa::token_major(dQ.data(), 1, S, H, D),
                          gqa::token_major(dK.data(), 1, S, G, D), gqa::token_major(dV.data(), 1, S, G, D), opt);
  prob.rope->apply(dK, G, /*inverse=*/true);
  grad->wk.noalias() = dK.transpose() * X;
  grad->wv.noalias() = dV.transpose() * X;
  if (p.has_bias()) {
    grad->bk = dK.colwise().sum();
    grad->bv = dV.colwise().sum();
  } else {
    grad->bk.resize(0);
    grad->bv.resize(0);
  }
  return loss;
}

/// Mean squared error over the windows listed (mean over their tokens and the hidden size) and, with `grad`, its
/// gradient. Windows run in parallel on `threads` OpenMP threads (0: omp_get_max_threads()); the result does not
/// depend on the thread count (see the header comment).
template <typename T>
double batch_loss(const LayerProblem<T>& prob, const KVWeights<T>& p, const std::vector<Index>& windows,
                  typename NoDeduce<KVWeights<T>>::type* grad = nullptr, int threads = 0) {
  const Index n = Index(windows.size());
  std::vector<double> losses(size_t(n), 0.0);
  std::vector<KVWeights<T>> grads(grad ? size_t(n) : 0);
  const int team = threads > 0 ? threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(team)
  for (Index i = 0; i < n; ++i)
    losses[size_t(i)] = window_loss(prob, p, windows[size_t(i)], grad ? &grads[size_t(i)] : nullptr);
  double total = 0;
  for (double l : losses) total += l;
  const double count = double(n) * double(prob.window) * double(prob.hidden());
  if (grad) {
    *grad = std::move(grads[0]);
    for (Index i = 1; i < n; ++i) grad->add(grads[size_t(i)]);
    grad->scale(T(1.0 / count));
  }
  return total / count;
}

/// Adam (Kingma & Ba) with bias correction, on KVWeights.
template <typename T>
class Adam {
 public:
  Adam(const KVWeights<T>& shape, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : m_(shape.zeros_like()), v_(shape.zeros_like()), b1_(beta1), b2_(beta2), eps_(eps) {}

  /// One step of size lr along the gradient g.
  void step(KVWeights<T>& p, const KVWeights<T>& g, double lr) {
    ++t_;
    const double c1 = 1 - std::pow(b1_, double(t_)), c2 = 1 - std::pow(b2_, double(t_));
    update(p.wk, g.wk, m_.wk, v_.wk, lr, c1, c2);
    update(p.wv, g.wv, m_.wv, v_.wv, lr, c1, c2);
    update(p.bk, g.bk, m_.bk, v_.bk, lr, c1, c2);
    update(p.bv, g.bv, m_.bv, v_.bv, lr, c1, c2);
  }

 private:
  template <typename M>
  void update(M& p, const M& g, M& m, M& v, double lr, double c1, double c2) const {
    for (Index i = 0; i < p.size(); ++i) {
      const double gi = double(g.data()[i]);
      const double mi = b1_ * double(m.data()[i]) + (1 - b1_) * gi;
      const double vi = b2_ * double(v.data()[i]) + (1 - b2_) * gi * gi;
      m.data()[i] = T(mi);
      v.data()[i] = T(vi);
      p.data()[i] -= T(lr * (mi / c1) / (std::sqrt(vi / c2) + eps_));
    }
  }

  KVWeights<T> m_, v_;
  double b1_, b2_, eps_;
  long t_ = 0;
};

}  // namespace uptrain
