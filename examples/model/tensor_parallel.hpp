// examples/model/tensor_parallel.hpp — the decoder of llama.hpp split by heads across the ranks of an MPI
// communicator (tensor parallel, as `mpirun -np P example_decoder MODEL ... --tensor-parallel` runs it). Needs
// gqa::mpi (gqa/distributed.hpp); llama.hpp itself stays free of MPI.
//
// Offers (namespace llama):
//   TensorParallel group(comm)     this rank's place in comm, and the check that ends every rank together
//   group.shard(config)            the llama::Shard of this rank, for Model::load(dir, shard)
//   group.agree(ok)                the one collective check before the first forward pass (see below)
//
// The split: rank r of P keeps the query heads and KV heads gqa::head_shard(H, G, P, r) gives it (P <= G: G/P KV
// heads each; P > G: each KV head on P/G ranks), their rows of q/k/v_proj, their columns of o_proj, and
// intermediate rows [r I/P, (r+1) I/P) of gate/up_proj (columns of down_proj): P must divide intermediate_size
// (even splits only: SmolLM2's 1536 splits over 1, 2, 3, 4, 6, ...). Its KV cache holds its KV heads only. The
// partial sums of o_proj and down_proj [S, hidden] are completed by an all-reduce that is deterministic: an
// MPI_Allgather of every rank's part, summed in rank order on each rank (MPI_SUM's order is the implementation's
// choice), so every rank holds the same bits and a run gives the same tokens whatever the timing. Per layer and
// token that is 2 * P * hidden floats received per rank. Embedding, norms and lm_head stay whole on every rank.
//
// Errors: an invalid P is refused with gqa::head_shard's gqa::invalid_argument [gqa.distributed.ranks] (naming H,
// G, P and the valid P), a P that does not divide intermediate_size with [gqa.decoder.tensor-parallel]. A rank
// that fails before the first all-reduce (a bad argument, a file, a weight of its slice) must call agree(false):
// the ranks meet in one MPI_Allreduce (the others at their first forward pass, inside the all-reduce), which
// tells every rank the lowest rank that failed; the healthy ranks then throw PeerFailed, so all ranks end
// together and one message is printed (by that rank). After that point the ranks compute the same values, so an
// error (a float overflow) is raised by all of them alike; one that is not (an MPI failure, memory) is the
// caller's to end with MPI_Abort.
#pragma once

#include "llama.hpp"

#include <gqa/distributed.hpp>

#include <mpi.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace llama {

/// Thrown on a healthy rank when another rank failed before the first forward pass (agree()).
struct PeerFailed : std::runtime_error {
  explicit PeerFailed(int lowest)
      : std::runtime_error("[gqa.decoder.peer] rank " + std::to_string(lowest) + " failed (its message says why)"),
        rank(lowest) {}
  int rank;
};

class TensorParallel {
 public:
  explicit TensorParallel(MPI_Comm comm) : comm_(comm), rank_(gqa::detail::comm_rank(comm)),
                                           size_(gqa::detail::comm_size(comm)) {}
  TensorParallel(const TensorParallel&) = delete;  // shard()'s all-reduce points to this object
  TensorParallel& operator=(const TensorParallel&) = delete;

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  bool agreed() const noexcept { return agreed_; }
  /// Bytes this rank handed to and got from MPI in the all-reduces so far.
  const gqa::DistributedStats& stats() const noexcept { return stats_; }

  /// This rank's part of every layer of a model with config c (see the header comment); throws if P cannot split it.
  Shard shard(const Config& c) {
    const gqa::HeadShard h = gqa::head_shard(c.heads, c.kv_heads, size_, rank_);
    check(c.intermediate % size_ == 0, "tensor-parallel", "--tensor-parallel: P = ", size_,
          " ranks do not divide intermediate_size = ", c.intermediate, " (the MLP is split evenly)");
    Shard s;
    s.first_head = h.first_head, s.num_heads = h.num_heads;
    s.first_kv_head = h.first_kv_head, s.num_kv_heads = h.num_kv_heads;
    s.num_intermediate = c.intermediate / size_;
    s.first_intermediate = rank_ * s.num_intermediate;
    s.owns_bias = rank_ == 0;
    s.all_reduce = [this](Matrix& partial) { all_reduce(partial); };
    return s;
  }

  /// The collective check (see the header comment): every rank calls it once, before or at its first all-reduce.
  /// Returns the lowest rank that failed, or size() when none did.
  int agree(bool ok) {
    gqa::detail::require(!agreed_, "decoder.peer", "TensorParallel::agree called twice");
    agreed_ = true;
    int mine = ok ? size_ : rank_, lowest = size_;
    gqa::detail::check_mpi(MPI_Allreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, comm_), "MPI_Allreduce");
    return lowest;
  }

 private:
  /// partial [S, hidden] := the sum over the ranks, in rank order (the same bits on every rank).
  void all_reduce(Matrix& partial) {
    if (!agreed_) {
      const int lowest = agree(true);
      if (lowest < size_) throw PeerFailed(lowest);
    }
    const Index n = partial.size();
    gathered_.resize(size_t(n) * size_t(size_));
    gqa::detail::check_mpi(MPI_Allgather(partial.data(), int(n), MPI_FLOAT, gathered_.data(), int(n), MPI_FLOAT,
                                         comm_), "MPI_Allgather");
    stats_.bytes_sent += std::uint64_t(n) * sizeof(float);
    stats_.bytes_received += std::uint64_t(n) * sizeof(float) * std::uint64_t(size_ - 1);
    ++stats_.messages;
    Eigen::Map<Eigen::ArrayXf> sum(partial.data(), n);
    sum = Eigen::Map<const Eigen::ArrayXf>(gathered_.data(), n);
    for (int r = 1; r < size_; ++r) sum += Eigen::Map<const Eigen::ArrayXf>(gathered_.data() + size_t(r) * size_t(n), n);
  }

  MPI_Comm comm_;
  int rank_, size_;
  bool agreed_ = false;
  std::vector<float> gathered_;
  gqa::DistributedStats stats_;
};

}  // namespace llama
