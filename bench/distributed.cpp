// bench/distributed.cpp — bytes on the wire and time of gqa/distributed.hpp, run under mpirun (a plain program,
// not Google Benchmark: its adaptive iteration counts would differ between ranks and leave collectives unpaired).
//
//   mpirun -np P build/bench/bench_distributed [--smoke] [--threads N]
//
// For each case it prints one row per run: the bytes each rank handed to MPI (gqa::DistributedStats, the largest
// and smallest over the ranks), the formula next to them, and the time of the slowest rank (MPI_Barrier before
// each repeat; the smallest, then the median, of the repeats):
//   decode    sequence-sharded decode of one token against S cached tokens (gqa::sequence_sharded_attention):
//             formula B * H * (D * 4 + 4) per rank and layer (its partial out and lse, f32), whatever S;
//             `alone`: the CPU time of the rank's attention on its share, each rank timed in turn (the rest of
//             `time` is the gather, the merge, and the ranks and other processes sharing the cores)
//   ring      causal ring prefill of S tokens (gqa::ring_attention): formula (P-1)/P * 2 * S * G * D * sizeof(kv)
//             per rank and layer; `alone`: the CPU time of the rank's block attentions without the ring, each rank
//             in turn; the `ring-wire` line times the ring's sends alone (the same messages, no attention)
//   ring-bwd  its backward (gqa::ring_attention_backward): formula (P-1)/P * 2 * S * G * D * sizeof(kv) for the
//             K/V blocks plus 2 * S * G * D * 4 for their f32 gradients, which follow each block and go home
//   repeat-kv the bytes the same ring would send with K/V repeated to H heads before the call (the bug of the
//             issue), for comparison: H/G times the ring's
// Exit status 1 if a measured byte count differs from its formula.
#include <gqa/attention.hpp>
#include <gqa/distributed.hpp>
#include <gqa/kv_cache.hpp>

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <time.h>

namespace {

using gqa::Index;
using gqa::Tensor4;

struct Config {
  bool smoke = false;
  int threads = 1;
  int repeats = 9;
};

int g_rank = 0, g_ranks = 1;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// The slowest rank's time of f() in ms: the smallest and the median over the repeats (on a shared machine the
/// smallest is the least disturbed).
struct Times {
  double min = 0, median = 0;
};

template <typename F>
Times time_ms(int repeats, F&& f) {
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double t0 = now_s();
    f();
    double mine = now_s() - t0, slowest = 0;
    MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
    times.push_back(slowest * 1e3);
  }
  std::sort(times.begin(), times.end());
  return {times.front(), times[times.size() / 2]};
}

double thread_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return double(t.tv_sec) + 1e-9 * double(t.tv_nsec);
}

/// The largest over the ranks of each rank's smallest CPU time of f() in ms (this thread's: with --threads 1 the
/// whole work), the ranks taking turns (the others wait in a barrier): one rank's compute, as far as possible
/// from the load that other processes put on a shared machine, which wall-clock times here cannot escape.
template <typename F>
double time_alone_ms(int repeats, F&& f) {
  double mine = 1e300;
  for (int r = 0; r < g_ranks; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    if (r != g_rank) continue;
    for (int i = 0; i < repeats; ++i) {
      const double t0 = thread_cpu_s();
      f();
      mine = std::min(mine, (thread_cpu_s() - t0) * 1e3);
    }
  }
  double slowest = 0;
  MPI_Allreduce(&mine, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

std::uint64_t max_over_ranks(std::uint64_t x, MPI_Op op = MPI_MAX) {
  unsigned long long in = x, out = 0;
  MPI_Allreduce(&in, &out, 1, MPI_UNSIGNED_LONG_LONG, op, MPI_COMM_WORLD);
  return out;
}

void fill(Tensor4<float>& t, unsigned seed) {
  std::uint32_t s = seed * 2654435761u + 1;
  for (Index i = 0; i < t.size(); ++i) {
    s = s * 1664525u + 1013904223u;
    t.data()[i] = float(s >> 8) / float(1 << 24) * 2.0f - 1.0f;
  }
}

bool print_row(const char* mode, Index H, Index G, Index D, Index S, std::uint64_t bytes, std::uint64_t formula,
               Times t, double alone_ms, const Config& c) {
  const std::uint64_t lo = max_over_ranks(bytes, MPI_MIN), hi = max_over_ranks(bytes, MPI_MAX);
  const bool equal = lo == formula && hi == formula;
  if (g_rank == 0)
    std::printf("%-9s H:%-3ld G:%-3ld D:%-4ld S:%-6ld P:%d threads:%d  bytes/rank %12llu..%-12llu formula %12llu %s"
                "  time %9.3f (median %9.3f) ms  alone %9.3f ms cpu\n",
                mode, long(H), long(G), long(D), long(S), g_ranks, c.threads, (unsigned long long)lo,
                (unsigned long long)hi, (unsigned long long)formula, equal ? "equal" : "DIFFERS", t.min, t.median,
                alone_ms);
  return equal;
}

bool bench_decode(Index H, Index G, Index D, Index S, const Config& c) {
  const Index B = 1;
  gqa::SequenceShardedCache<float> cache(MPI_COMM_WORLD, B, G, S, D);
  Tensor4<float> k(B, S, G, D), v(B, S, G, D), q(B, 1, H, D), out(B, 1, H, D);
  fill(k, 1), fill(v, 2), fill(q, 3);
  cache.append(k, v);
  gqa::AttentionOptions opt;
  opt.num_threads = c.threads;
  gqa::DistributedStats stats;
  gqa::sequence_sharded_attention(q, cache, out, opt, &stats);  // one call counted
  const std::uint64_t bytes = stats.bytes_sent;
  const Times ms = time_ms(c.repeats, [&] { gqa::sequence_sharded_attention(q, cache, out, opt); });
  const double local = time_alone_ms(c.repeats, [&] { gqa::attention(q, cache.local(), out, opt); });
  return print_row("decode", H, G, D, S, bytes, std::uint64_t(B * H * (D * 4 + 4)), ms, local, c);
}

/// The ring's sends alone: every rank's block once round the ring, as ring_attention sends it.
void ring_traffic(const std::vector<std::size_t>& block_bytes, std::vector<unsigned char>& a,
                  std::vector<unsigned char>& b) {
  const int right = (g_rank + 1) % g_ranks, left = (g_rank + g_ranks - 1) % g_ranks;
  for (int step = 0; step + 1 < g_ranks; ++step) {
    MPI_Request r[2];
    const std::size_t out = block_bytes[std::size_t((g_rank - step + g_ranks) % g_ranks)];
    const std::size_t in = block_bytes[std::size_t((g_rank - step - 1 + 2 * g_ranks) % g_ranks)];
    MPI_Irecv(b.data(), int(in), MPI_BYTE, left, 1, MPI_COMM_WORLD, &r[0]);
    MPI_Isend(a.data(), int(out), MPI_BYTE, right, 1, MPI_COMM_WORLD, &r[1]);
    MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
    std::swap(a, b);
  }
}

/// The block attentions ring_attention does on this rank, without the ring: its own q and k/v rows stand in for
/// the other ranks' blocks, which have the same shapes when 2P divides S.
void ring_block_work(const Tensor4<float>& q, const Tensor4<float>& kv, Tensor4<float>& out,
                     gqa::AttentionOptions opt, const gqa::RingLayout& me) {
  const auto qr = gqa::make_ref(q), kr = gqa::make_ref(kv);
  auto orf = gqa::make_ref(out);
  const auto rows = [](auto r, Index first, Index n) {
    r.data += first * r.strides[1];
    r.dims[1] = n;
    return r;
  };
  std::vector<float> lse(std::size_t(q.dimension(0) * q.dimension(2) * q.dimension(1)));
  for (int step = 0; step < g_ranks; ++step) {
    const gqa::RingLayout src = gqa::ring_layout(me.length, g_ranks, (g_rank - step + g_ranks) % g_ranks);
    for (int qc = 0; qc < 2; ++qc)
      for (int kc = 0; kc < 2; ++kc) {
        if (src.chunk[kc] > me.chunk[qc]) continue;
        const Index lq = me.chunk_length[qc], q0 = qc == 0 ? 0 : me.chunk_length[0];
        const Index k0 = kc == 0 ? 0 : me.chunk_length[0];
        gqa::AttentionOptions o = opt;
        o.causal = src.chunk[kc] == me.chunk[qc];
        o.lse = gqa::span<float>(lse.data(), q.dimension(0) * q.dimension(2) * lq);
        gqa::attention(rows(qr, q0, lq), rows(kr, k0, src.chunk_length[kc]), rows(kr, k0, src.chunk_length[kc]),
                       rows(orf, q0, lq), o);
      }
  }
}

bool bench_ring(Index H, Index G, Index D, Index S, const Config& c) {
  const Index B = 1;
  const gqa::RingLayout me = gqa::ring_layout(S, g_ranks, g_rank);
  const Index L = me.local_length();
  Tensor4<float> q(B, L, H, D), k(B, L, G, D), v(B, L, G, D), out(B, L, H, D);
  fill(q, 4 + unsigned(g_rank)), fill(k, 40 + unsigned(g_rank)), fill(v, 80 + unsigned(g_rank));
  gqa::AttentionOptions opt;
  opt.causal = true;
  opt.num_threads = c.threads;
  gqa::DistributedStats stats;
  gqa::ring_attention(q, k, v, out, MPI_COMM_WORLD, opt, &stats);
  const std::uint64_t bytes = stats.bytes_sent;
  const Times ms = time_ms(c.repeats, [&] { gqa::ring_attention(q, k, v, out, MPI_COMM_WORLD, opt); });
  std::vector<std::size_t> block_bytes;
  for (int r = 0; r < g_ranks; ++r)
    block_bytes.push_back(std::size_t(2 * B * gqa::ring_layout(S, g_ranks, r).local_length() * G * D * 4));
  std::vector<unsigned char> a(*std::max_element(block_bytes.begin(), block_bytes.end())), b(a.size());
  const Times traffic = time_ms(c.repeats, [&] { ring_traffic(block_bytes, a, b); });
  const double compute = time_alone_ms(c.repeats, [&] { ring_block_work(q, k, out, opt, me); });
  const std::uint64_t formula = std::uint64_t((g_ranks - 1) * 2 * B * S * G * D * 4 / g_ranks);
  bool ok = print_row("ring", H, G, D, S, bytes, formula, ms, compute, c);
  if (g_rank == 0)
    std::printf("%-9s H:%-3ld G:%-3ld D:%-4ld S:%-6ld P:%d             the ring's sends alone: %.3f (median %.3f) ms\n",
                "ring-wire", long(H), long(G), long(D), long(S), g_ranks, traffic.min, traffic.median);

  // The backward: the forward's K/V traffic plus each block's d_k / d_v (f32) passed on P times.
  std::vector<float> lse(std::size_t(B * H * L));
  opt.lse = lse;
  gqa::ring_attention(q, k, v, out, MPI_COMM_WORLD, opt);
  Tensor4<float> d_out(B, L, H, D), d_q(B, L, H, D), d_k(B, L, G, D), d_v(B, L, G, D);
  fill(d_out, 120 + unsigned(g_rank));
  gqa::DistributedStats back;
  gqa::ring_attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, MPI_COMM_WORLD, opt, &back);
  const Times bwd = time_ms(c.repeats, [&] {
    gqa::ring_attention_backward(q, k, v, out, d_out, d_q, d_k, d_v, MPI_COMM_WORLD, opt);
  });
  const std::uint64_t bwd_formula = formula + std::uint64_t(2 * B * S * G * D * 4);
  ok = print_row("ring-bwd", H, G, D, S, back.bytes_sent, bwd_formula, bwd, 0.0, c) && ok;
  if (g_rank == 0 && G < H)
    std::printf("%-9s H:%-3ld G:%-3ld D:%-4ld S:%-6ld P:%d             would send %12llu bytes/rank (H/G = %ld x)\n",
                "repeat-kv", long(H), long(H), long(D), long(S), g_ranks,
                (unsigned long long)(formula * std::uint64_t(H / G)), long(H / G));
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &g_ranks);
  Config c;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--smoke") == 0) {
      c.smoke = true;
      c.repeats = 1;
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      c.threads = std::atoi(argv[++i]);
    } else {
      if (g_rank == 0) std::fprintf(stderr, "usage: mpirun -np P %s [--smoke] [--threads N]\n", argv[0]);
      MPI_Finalize();
      return 2;
    }
  }
  // Llama-3-8B's attention (H = 32, G = 8, D = 128); S a multiple of 2P for P up to 4, so the formula is exact.
  const Index H = 32, G = 8, D = 128;
  bool ok = true;
  if (c.smoke) {
    ok = bench_decode(4, 2, 16, 48, c) && ok;
    ok = bench_ring(4, 2, 16, 48, c) && ok;
  } else {
    for (Index S : {4096, 32768}) ok = bench_decode(H, G, D, S, c) && ok;
    for (Index S : {1024, 2048}) ok = bench_ring(H, G, D, S, c) && ok;
  }
  MPI_Finalize();
  return ok ? 0 : 1;
}
