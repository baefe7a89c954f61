// serve.cpp — serving many requests from one paged KV cache: a shared system prompt stored once, requests admitted
// while blocks are free, every running request decoded in one batched call per step, finished ones released.
//
// One attention layer, H = 32 query heads, G = 8 KV heads, D = 128 (a Llama-style shape). Where a model would
// compute each token's q, k and v from its hidden state, this program makes them up (deterministic values in
// [-1, 1]): the point is the cache's bookkeeping and the batched decode, which are the same for any model. At the
// end every running request's output is checked against gqa::reference_attention (double precision) on the same
// stored K/V, and the program exits with status 1 if any differs by more than 1e-4.
//
// It prints the memory the pool reserved against what contiguous caches would reserve for the same requests (one
// capacity of the longest request per request, the shared prompt in each), and the attention tokens/s.
//
// Build: link gqa::gqa (see README.md), or from gqa's build tree run build/examples/example_serve.
#include <gqa/gqa.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <vector>

namespace {

using gqa::Index;
constexpr Index kHeads = 32, kKvHeads = 8, kHeadDim = 128, kBlock = 32;
constexpr Index kSystemPrompt = 1000, kRequests = 24, kMaxRunning = 8;

/// Stand-in for a model's projections of token `position` of request `request`: values in [-1, 1].
void make_up(float* data, Index n, Index request, Index position) {
  for (Index i = 0; i < n; ++i) data[i] = float(std::sin(0.013 * double(i) + 0.7 * double(request) + 0.11 * double(position)));
}

struct Request {
  std::int32_t id = -1;
  Index index = 0, prompt = 0, to_generate = 0, generated = 0;
};

/// Checks the attention output of every running request against the double reference on its stored K/V.
double check_against_reference(const gqa::PagedKVCache<gqa::bfloat16>& cache, const std::vector<std::int32_t>& ids,
                               const gqa::Tensor4<float>& q, const gqa::Tensor4<float>& out) {
  double worst = 0;
  for (size_t b = 0; b < ids.size(); ++b) {
    const Index len = cache.length(ids[b]);
    gqa::Tensor4<gqa::bfloat16> k(1, len, kKvHeads, kHeadDim), v(1, len, kKvHeads, kHeadDim);
    const auto table = cache.block_table(ids[b]);
    for (Index j = 0; j < len; ++j)
      for (Index g = 0; g < kKvHeads; ++g)
        for (Index d = 0; d < kHeadDim; ++d) {
          k(0, j, g, d) = cache.key_storage()(g, table[j / kBlock], j % kBlock, d);
          v(0, j, g, d) = cache.value_storage()(g, table[j / kBlock], j % kBlock, d);
        }
    gqa::Tensor4<float> qb(1, 1, kHeads, kHeadDim);
    std::copy_n(&q(Index(b), 0, 0, 0), kHeads * kHeadDim, qb.data());
    const auto ref = gqa::reference_attention<float, gqa::bfloat16>(gqa::make_ref(qb), gqa::make_ref(k), gqa::make_ref(v));
    for (Index i = 0; i < kHeads * kHeadDim; ++i)
      worst = std::max(worst, std::fabs(double((&out(Index(b), 0, 0, 0))[i]) - ref.data()[i]));
  }
  return worst;
}

}  // namespace

int main() {
  try {
    // A pool for about 8 requests of up to ~1000 own tokens beside the shared prompt.
    gqa::PagedKVCache<gqa::bfloat16> cache(kKvHeads, kHeadDim, kBlock, 320);
    const std::int32_t system = cache.add_sequence();
    gqa::Tensor4<float> prompt_kv(1, kSystemPrompt, kKvHeads, kHeadDim);
    make_up(prompt_kv.data(), prompt_kv.size(), 0, 0);
    cache.append(system, prompt_kv, prompt_kv);  // K and V alike here: made-up values either way

    std::vector<Request> waiting, running;
    for (Index r = 0; r < kRequests; ++r)  // own prompts of 50-750 tokens, 16-200 tokens to generate
      waiting.push_back({-1, r, 50 + (r * 277) % 700, 16 + (r * 71) % 185, 0});
    std::reverse(waiting.begin(), waiting.end());

    Index steps = 0, tokens = 0, peak_reserved = 0, longest = 0;
    double attention_seconds = 0, worst = 0;
    while (!waiting.empty() || !running.empty()) {
      // Admit while the free blocks cover every running request's remaining tokens and the new one's, each with a
      // block to spare for its copied partial block (blocks are taken as tokens come).
      auto room_for = [&](const Request& next) {
        Index tokens_ahead = next.prompt + next.to_generate + 2 * kBlock;
        for (const Request& r : running) tokens_ahead += r.to_generate - r.generated + kBlock;
        return cache.blocks_free() * kBlock >= tokens_ahead;
      };
      while (!waiting.empty() && Index(running.size()) < kMaxRunning && room_for(waiting.back())) {
        Request r = waiting.back();
        waiting.pop_back();
        r.id = cache.fork(system);  // shares the system prompt's blocks
        gqa::Tensor4<float> own(1, r.prompt, kKvHeads, kHeadDim);
        make_up(own.data(), own.size(), r.index + 1, kSystemPrompt);
        cache.append(r.id, own, own);
        longest = std::max(longest, kSystemPrompt + r.prompt + r.to_generate);
        running.push_back(r);
      }
      // One decode step for every running request: append its new token's K/V, then attend, in one call each.
      const Index B = Index(running.size());
      std::vector<std::int32_t> ids;
      for (const Request& r : running) ids.push_back(r.id);
      gqa::Tensor4<float> kv(B, 1, kKvHeads, kHeadDim), q(B, 1, kHeads, kHeadDim), out(B, 1, kHeads, kHeadDim);
      for (Index b = 0; b < B; ++b) {
        const Index position = cache.length(ids[size_t(b)]);
        make_up(&kv(b, 0, 0, 0), kKvHeads * kHeadDim, running[size_t(b)].index + 1, position);
        make_up(&q(b, 0, 0, 0), kHeads * kHeadDim, running[size_t(b)].index + 101, position);
      }
      cache.append(ids, kv, kv);
      const auto start = std::chrono::steady_clock::now();
      gqa::attention(q, cache, ids, out);
      attention_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      peak_reserved = std::max(peak_reserved, Index(cache.bytes_reserved()));
      ++steps, tokens += B;
      if (steps % 64 == 1) worst = std::max(worst, check_against_reference(cache, ids, q, out));
      // Finished requests give their blocks back (the shared prompt stays with `system`).
      for (Request& r : running) ++r.generated;
      for (const Request& r : running)
        if (r.generated == r.to_generate) cache.release(r.id);
      running.erase(std::remove_if(running.begin(), running.end(),
                                   [](const Request& r) { return r.generated == r.to_generate; }),
                    running.end());
    }
    // Contiguous caches for the same concurrency: kMaxRunning sequences of the longest request's length each.
    const double contiguous = double(kMaxRunning * longest) * double(cache.bytes_per_token());
    std::printf("%lld requests, %lld decode steps, %lld tokens; attention %.1f tokens/s\n", (long long)kRequests,
                (long long)steps, (long long)tokens, double(tokens) / attention_seconds);
    std::printf("peak reserved %.1f MiB; contiguous caches for %lld requests of up to %lld tokens: %.1f MiB "
                "(%.2fx more)\n",
                double(peak_reserved) / 1048576.0, (long long)kMaxRunning, (long long)longest,
                contiguous / 1048576.0, contiguous / double(peak_reserved));
    std::printf("max |out - reference| %.2e  %s\n", worst, worst < 1e-4 ? "ok" : "MISMATCH");
    return worst < 1e-4 ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve: %s\n", e.what());
    return 1;
  }
}
