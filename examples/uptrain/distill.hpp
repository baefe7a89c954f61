// examples/uptrain/distill.hpp — the math of gqa-uptrain: one attention layer's projections (K and V, or Q, K, V and
// O) trained so that its output after o_proj matches a target (layer-wise distillation), with gqa::attention forward
// and gqa::attention_backward for the gradient.
//
// Offers (namespace uptrain):
//   Rope<T>              Hugging Face's rotary embedding (rotate_half) for positions 0 .. S-1, and its transpose
//   LayerWeights<T>      the trainable parameters: W_k, W_v [G*D, hidden], b_k, b_v [G*D]; and, when queries and
//                        output are trained, W_q [H*D, hidden], b_q [H*D], W_o [hidden, H*D] (biases optional)
//   LayerProblem<T>      one layer's fixed data: normed inputs X [N*S, hidden], target Y [N*S, hidden], and when
//                        W_q, W_o are not trained the rotated queries Q [N*S, H*D] and o_proj W_o [hidden, H*D];
//                        N windows of S tokens, each at positions 0..S-1
//   window_loss()        sum over one window of (out - y)^2, and optionally its gradient with respect to LayerWeights
//   batch_loss()         mean squared error over a list of windows (threads over windows) and its gradient
//   for_each_window()    the loop over windows that both use: one window per thread, single-threaded inside
//   Adam                 the optimizer, on LayerWeights
//
// Gradient path of one window (S tokens, all shapes row-major):
//   K = rope(X W_k^T + b_k) [S, G*D], V = X W_v^T + b_v [S, G*D], A = attention(Q, K, V, causal) [S, H*D],
//   out = A W_o^T [S, hidden], loss = sum (out - Y)^2
//   d_out = 2 (out - Y);  d_A = d_out W_o;  (d_K, d_V) = gqa::attention_backward (d_K, d_V summed per group);
//   d_K <- rope^T(d_K) (the rotation's transpose: the inverse rotation);  dW_k = d_K^T X, db_k = sum_rows d_K; same for V.
//   Queries and output trained too: Q = rope(X W_q^T + b_q) is computed from the weights, d_Q <- rope^T(d_Q),
//   dW_q = d_Q^T X, db_q = sum_rows d_Q, and dW_o = d_out^T A.
//
// Determinism: every window is computed on one thread (for_each_window: Eigen products and gqa calls with
// num_threads = 1 run single-threaded inside it), its gradient goes to its own buffer, and the buffers are summed in
// window order, so a step gives bitwise the same result for every thread count.
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

/// The trainable parameters of one layer (or their gradients): W_k, W_v [G*D, hidden] always; W_q [H*D, hidden] and
/// W_o [hidden, H*D] when queries and output are trained too (empty otherwise: the problem's fixed rotated queries
/// and o_proj are used). Biases b_q [H*D], b_k, b_v [G*D] when the checkpoint has them (empty otherwise).
template <typename T>
struct LayerWeights {
  Mat<T> wq, wk, wv, wo;
  RowVec<T> bq, bk, bv;

  bool has_bias() const { return bk.size() != 0; }
  bool trains_qo() const { return wq.size() != 0; }
  /// Zeros of the same shapes.
  LayerWeights zeros_like() const {
    LayerWeights z;
    z.for_each_with(*this, [](auto& a, const auto& b) { a.setZero(b.rows(), b.cols()); });
    return z;
  }
  void add(const LayerWeights& o) {
    for_each_with(o, [](auto& a, const auto& b) { a += b; });
  }
  void scale(T s) {
    for_each_with(*this, [s](auto& a, const auto&) { a *= s; });
  }
  /// f(this tensor, other's tensor of the same name), over every tensor (empty ones too, which Eigen no-ops on).
  template <typename F>
  void for_each_with(const LayerWeights& o, F&& f) {
    f(wq, o.wq);
    f(wk, o.wk);
    f(wv, o.wv);
    f(wo, o.wo);
    f(bq, o.bq);
    f(bk, o.bk);
    f(bv, o.bv);
  }
};

/// One layer's fixed data for N windows of S tokens (see the header comment).
template <typename T>
struct LayerProblem {
  Index window = 0;                   ///< S
  Index heads = 0, kv_heads = 0, head_dim = 0;
  Index sliding_window = 0;           ///< gqa::AttentionOptions::window (0: none)
  Mat<T> x;                           ///< [N*S, hidden] the layer's input after input_layernorm
  Mat<T> q;                           ///< [N*S, H*D] queries, bias added and rotated (only when W_q is not trained)
  Mat<T> y;                           ///< [N*S, hidden] the target (the original layer's attention output after
                                      ///< o_proj, or that plus the residual drift: uptrain.hpp's Target)
  Mat<T> wo;                          ///< [hidden, H*D] o_proj when not trained (its bias, if any, cancels in out - y)
  const Rope<T>* rope = nullptr;

  Index windows() const { return window ? x.rows() / window : 0; }
  Index hidden() const { return x.cols(); }
};

/// Keeps a parameter out of template argument deduction (std::type_identity, C++20), so nullptr can be passed.
template <typename T>
struct NoDeduce {
  using type = T;
};

/// Runs body(i) for i in 0 .. n-1 on a team of `threads` OpenMP threads, each i on one thread. Each thread first
/// sets its own thread count to 1: Eigen takes a team of one (threads = 1) for "not in a parallel region" and would
/// fork a team of omp_get_max_threads() threads inside every product of every window, and libgomp starts the
/// threads of such a nested team anew each time (gqa-uptrain --threads 1 was 10-300x slower than --threads 2, which
/// an active team of two serialises). With the count set here, nothing inside a window forks.
template <typename Body>
void for_each_window(Index n, int threads, Body&& body) {
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);  // this thread's nthreads-var only: what regions and Eigen products inside it may use
#pragma omp for schedule(dynamic, 1)
    for (Index i = 0; i < n; ++i) body(i);
  }
}

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
double window_loss(const LayerProblem<T>& prob, const LayerWeights<T>& p, Index w,
                   typename NoDeduce<LayerWeights<T>>::type* grad = nullptr) {
  const Index S = prob.window, H = prob.heads, G = prob.kv_heads, D = prob.head_dim;
  const bool qo = p.trains_qo();
  const auto X = prob.x.middleRows(w * S, S);
  Mat<T> Q;  // only when trained: otherwise the problem's fixed queries are read in place
  if (qo) {
    Q.noalias() = X * p.wq.transpose();
    if (p.bq.size()) Q.rowwise() += p.bq;
    prob.rope->apply(Q, H);
  }
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
  const T* q_data = qo ? Q.data() : prob.q.middleRows(w * S, S).data();
  const auto q_ref = gqa::token_major<const T>(q_data, 1, S, H, D);
  const auto k_ref = gqa::token_major<const T>(K.data(), 1, S, G, D);
  const auto v_ref = gqa::token_major<const T>(V.data(), 1, S, G, D);
  gqa::attention(q_ref, k_ref, v_ref, gqa::token_major(A.data(), 1, S, H, D), opt);
  const Mat<T>& wo = qo ? p.wo : prob.wo;
  Mat<T> d_out = A * wo.transpose() - prob.y.middleRows(w * S, S);  // out - y, then its gradient 2 (out - y)
  const double loss = d_out.template cast<double>().squaredNorm();
  if (!grad) return loss;

  d_out *= T(2);
  const Mat<T> dA = d_out * wo;  // [S, H*D]
  Mat<T> dQ(S, H * D), dK(S, G * D), dV(S, G * D);
  gqa::attention_backward(q_ref, k_ref, v_ref, gqa::token_major<const T>(A.data(), 1, S, H, D),
                          gqa::token_major<const T>(dA.data(), 1, S, H, D), gqa::token_major(dQ.data(), 1, S, H, D),
                          gqa::token_major(dK.data(), 1, S, G, D), gqa::token_major(dV.data(), 1, S, G, D), opt);
  prob.rope->apply(dK, G, /*inverse=*/true);
  grad->wk.noalias() = dK.transpose() * X;
  grad->wv.noalias() = dV.transpose() * X;
  grad->bk = p.has_bias() ? RowVec<T>(dK.colwise().sum()) : RowVec<T>();
  grad->bv = p.has_bias() ? RowVec<T>(dV.colwise().sum()) : RowVec<T>();
  if (qo) {
    prob.rope->apply(dQ, H, /*inverse=*/true);
    grad->wq.noalias() = dQ.transpose() * X;
    grad->bq = p.bq.size() ? RowVec<T>(dQ.colwise().sum()) : RowVec<T>();
    grad->wo.noalias() = d_out.transpose() * A;
  } else {
    grad->wq.resize(0, 0);
    grad->wo.resize(0, 0);
    grad->bq.resize(0);
  }
  return loss;
}

/// Mean squared error over the windows listed (mean over their tokens and the hidden size) and, with `grad`, its
/// gradient. Windows run in parallel on `threads` OpenMP threads (0: omp_get_max_threads()); the result does not
/// depend on the thread count (see the header comment).
template <typename T>
double batch_loss(const LayerProblem<T>& prob, const LayerWeights<T>& p, const std::vector<Index>& windows,
                  typename NoDeduce<LayerWeights<T>>::type* grad = nullptr, int threads = 0) {
  const Index n = Index(windows.size());
  std::vector<double> losses(size_t(n), 0.0);
  std::vector<LayerWeights<T>> grads(grad ? size_t(n) : 0);
  const int team = threads > 0 ? threads : omp_get_max_threads();
  for_each_window(n, team, [&](Index i) {
    losses[size_t(i)] = window_loss(prob, p, windows[size_t(i)], grad ? &grads[size_t(i)] : nullptr);
  });
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

/// Adam (Kingma & Ba) with bias correction, on LayerWeights.
template <typename T>
class Adam {
 public:
  Adam(const LayerWeights<T>& shape, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
      : m_(shape.zeros_like()), v_(shape.zeros_like()), b1_(beta1), b2_(beta2), eps_(eps) {}

  /// One step of size lr along the gradient g.
  void step(LayerWeights<T>& p, const LayerWeights<T>& g, double lr) {
    ++t_;
    const double c1 = 1 - std::pow(b1_, double(t_)), c2 = 1 - std::pow(b2_, double(t_));
    update(p.wq, g.wq, m_.wq, v_.wq, lr, c1, c2);
    update(p.wk, g.wk, m_.wk, v_.wk, lr, c1, c2);
    update(p.wv, g.wv, m_.wv, v_.wv, lr, c1, c2);
    update(p.wo, g.wo, m_.wo, v_.wo, lr, c1, c2);
    update(p.bq, g.bq, m_.bq, v_.bq, lr, c1, c2);
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

  LayerWeights<T> m_, v_;
  double b1_, b2_, eps_;
  long t_ = 0;
};

}  // namespace uptrain
