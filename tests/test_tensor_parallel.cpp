// Tests of the example decoder split by heads across MPI ranks (examples/model/tensor_parallel.hpp, llama::Shard;
// example_decoder --tensor-parallel). Run under mpirun on P = 1, 2, 3 and 4 ranks (tests/cmake/distributed.cmake),
// every rank the same cases in the same order; each rank writes its own copy of the tiny random checkpoint
// (tests/support/llama_fixture.hpp) and computes the one-process reference itself.
//
// The three shapes cover the head-split rule of gqa::head_shard for each P: H = 8, G = 4 (P = 2 < G, P = 4 = G),
// H = 6, G = 3 (P = 3 = G), H = 4, G = 1 (P = 2, 4 > G: the one KV head on every rank); a P the shape cannot
// split is refused with the library's message. Tolerances: a rank's o_proj and down_proj sums are summed over the
// ranks in another order than one process's product, so logits agree to float rounding (1e-5 of their largest
// magnitude), perplexity within 1e-4 relative (the bar; measured far below it), greedy tokens exactly, and
// every rank holds the same bits (the all-reduce sums in rank order).
#include "../examples/model/llama.hpp"
#include "../examples/model/tensor_parallel.hpp"

#include "support/checkpoint_fixtures.hpp"
#include "support/llama_fixture.hpp"

#include <catch2/catch.hpp>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

namespace {

using Catch::Matchers::Contains;
using gqa::Index;
using gqa_test::LlamaFixture;
using gqa_test::TempDir;

int world_size() {
  int p = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

LlamaFixture tiny(std::int64_t heads, std::int64_t kv_heads) {
  LlamaFixture f;
  f.layers = 2, f.heads = heads, f.kv_heads = kv_heads, f.hidden = 48, f.intermediate = 24, f.vocab = 64;
  f.max_positions = 64;
  return f;
}

/// The prompt's greedy continuation of `count` tokens (prefill in chunks of 4, then one token per step).
std::vector<std::int32_t> greedy(const llama::Model& m, const std::vector<std::int32_t>& prompt, Index count) {
  llama::State<float> state(m, Index(prompt.size()) + count);
  llama::Matrix logits;
  for (size_t s = 0; s < prompt.size(); s += 4) {
    const Index n = std::min<Index>(4, Index(prompt.size() - s));
    m.forward(gqa::span<const std::int32_t>(prompt.data() + s, n), state, &logits);
  }
  llama::Sampler greedy_pick;
  std::vector<std::int32_t> out{greedy_pick.next(logits.data(), m.config().vocab)};
  while (Index(out.size()) < count) {
    m.forward(gqa::span<const std::int32_t>(&out.back(), 1), state, &logits);
    out.push_back(greedy_pick.next(logits.data(), m.config().vocab));
  }
  return out;
}

llama::Matrix all_logits(const llama::Model& m, const std::vector<std::int32_t>& ids) {
  llama::State<float> state(m, Index(ids.size()));
  llama::Matrix logits;
  m.forward(gqa::span<const std::int32_t>(ids.data(), Index(ids.size())), state, &logits, true);
  return logits;
}

std::vector<std::int32_t> some_ids(Index n, Index vocab) {
  std::vector<std::int32_t> ids;
  for (Index i = 0; i < n; ++i) ids.push_back(std::int32_t((i * 37 + 11) % vocab));
  return ids;
}

/// Whether every rank's `m` holds the same bytes as rank 0's.
bool same_on_every_rank(const llama::Matrix& m) {
  std::vector<float> root(m.data(), m.data() + m.size());
  MPI_Bcast(root.data(), int(root.size()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  int same = std::memcmp(root.data(), m.data(), root.size() * sizeof(float)) == 0, all = 0;
  MPI_Allreduce(&same, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all == 1;
}

}  // namespace

TEST_CASE("tensor-parallel decoding gives one process's greedy tokens, logits and perplexity", "[tensor_parallel]") {
  const int P = world_size();
  for (const auto& [H, G] : {std::pair<int, int>{8, 4}, {6, 3}, {4, 1}}) {
    CAPTURE(P, H, G);
    LlamaFixture f = tiny(H, G);
    f.biases = H == 8;  // q/k/v biases (Qwen2): sliced with their rows
    TempDir dir;
    f.write(dir.path());
    const llama::Config config = llama::read_config(dir.path());
    llama::TensorParallel group(MPI_COMM_WORLD);
    const std::vector<int> valid = gqa::valid_head_shard_ranks(H, G);
    if (std::find(valid.begin(), valid.end(), P) == valid.end()) {
      CHECK_THROWS_AS(group.shard(config), gqa::invalid_argument);
      CHECK_THROWS_WITH(group.shard(config), Contains("[gqa.distributed.ranks]") && Contains("H = " + std::to_string(H)) &&
                                                 Contains("G = " + std::to_string(G)) && Contains("valid P"));
      continue;
    }
    const llama::Model whole = llama::Model::load(dir.path());
    const llama::Model part = llama::Model::load(dir.path(), group.shard(config));
    const gqa::HeadShard heads = gqa::head_shard(H, G, P, group.rank());
    const Index D = config.head_dim;
    // Only this rank's rows and columns are kept, and its KV heads' cache.
    const llama::Layer& L = part.layer(1);
    CHECK(L.q.rows == heads.num_heads * D);
    CHECK(L.k.rows == heads.num_kv_heads * D);
    CHECK(L.o.cols == heads.num_heads * D);
    CHECK(L.gate.rows == config.intermediate / P);
    CHECK(L.down.cols == config.intermediate / P);
    const llama::Layer& W = whole.layer(1);
    CHECK(L.q.w() == W.q.w().middleRows(heads.first_head * D, heads.num_heads * D));
    CHECK(L.v.w() == W.v.w().middleRows(heads.first_kv_head * D, heads.num_kv_heads * D));
    CHECK(L.o.w() == W.o.w().middleCols(heads.first_head * D, heads.num_heads * D));
    CHECK(L.up.w() == W.up.w().middleRows(group.rank() * config.intermediate / P, config.intermediate / P));
    CHECK(L.down.w() == W.down.w().middleCols(group.rank() * config.intermediate / P, config.intermediate / P));
    CHECK(llama::State<float>(part, 8).cache(0).kv_heads() == heads.num_kv_heads);

    const std::vector<std::int32_t> ids = some_ids(12, config.vocab);
    const llama::Matrix expected = all_logits(whole, ids), got = all_logits(part, ids);
    REQUIRE(got.rows() == expected.rows());
    REQUIRE(got.cols() == expected.cols());
    const float scale = expected.cwiseAbs().maxCoeff();
    CHECK((got - expected).cwiseAbs().maxCoeff() <= 1e-5f * scale);
    CHECK(same_on_every_rank(got));

    const std::vector<std::int32_t> prompt(ids.begin(), ids.begin() + 6);
    CHECK(greedy(part, prompt, 20) == greedy(whole, prompt, 20));

    const std::vector<std::int32_t> text = some_ids(40, config.vocab);
    const double one = llama::perplexity<float>(whole, text, 16, 5).value();
    const double split = llama::perplexity<float>(part, text, 16, 5).value();
    CHECK(std::abs(split - one) <= 1e-4 * one);
  }
}

TEST_CASE("tensor parallel refuses a P that splits neither the heads nor intermediate_size", "[tensor_parallel]") {
  const int P = world_size();
  if (P == 1) return;  // one rank splits every model
  llama::TensorParallel group(MPI_COMM_WORLD);
  llama::Config c;
  c.heads = c.kv_heads = P + 1, c.intermediate = 12 * P;  // P divides neither H nor G
  CHECK_THROWS_AS(group.shard(c), gqa::invalid_argument);
  CHECK_THROWS_WITH(group.shard(c), Contains("[gqa.distributed.ranks]") && Contains("P = " + std::to_string(P)) &&
                                        Contains("valid P: 1"));
  c.heads = c.kv_heads = P, c.intermediate = 12 * P + 1;  // the heads split; the MLP does not
  CHECK_THROWS_WITH(group.shard(c), Contains("[gqa.decoder.tensor-parallel]") &&
                                        Contains("intermediate_size = " + std::to_string(12 * P + 1)));
}

TEST_CASE("a weight that fails on one rank's slice ends every rank, before any all-reduce", "[tensor_parallel]") {
  namespace st = gqa::safetensors;
  const int P = world_size();
  LlamaFixture f = tiny(12, 1);  // MQA: every P of 1 .. 4 splits it
  TempDir dir;
  f.write(dir.path());
  // A NaN in gate_proj's last row: the last rank's slice only (row I - 1, column 3).
  const std::string name = "model.layers.1.mlp.gate_proj.weight";
  std::vector<std::byte> bytes;
  {
    const auto file = st::File::open(dir / "model.safetensors");
    std::vector<st::TensorView> tensors = file.tensors();
    for (auto& t : tensors)
      if (t.name == name) {
        bytes.assign(t.bytes.data(), t.bytes.data() + t.bytes.size());
        const float nan = std::numeric_limits<float>::quiet_NaN();
        std::memcpy(bytes.data() + 4 * ((f.intermediate - 1) * f.hidden + 3), &nan, 4);
        t.bytes = gqa::span<const std::byte>(bytes.data(), Index(bytes.size()));
      }
    st::save(dir / "edited.safetensors", tensors);
  }
  std::filesystem::rename(dir / "edited.safetensors", dir / "model.safetensors");
  llama::TensorParallel group(MPI_COMM_WORLD);
  const llama::Config config = llama::read_config(dir.path());
  if (group.rank() == P - 1) {
    CHECK_THROWS_WITH(llama::Model::load(dir.path(), group.shard(config)),
                      Contains("[gqa.decoder.nonfinite]") && Contains(name) &&
                          Contains("at [" + std::to_string(f.intermediate - 1) + ", 3]"));
    CHECK(group.agree(false) == P - 1);  // what the decoder's error path does
  } else {
    const llama::Model part = llama::Model::load(dir.path(), group.shard(config));  // its slice is finite
    llama::State<float> state(part, 4);
    const std::int32_t id = 5;
    try {
      part.forward(gqa::span<const std::int32_t>(&id, 1), state);
      FAIL("forward ran although rank " << P - 1 << " failed");
    } catch (const llama::PeerFailed& e) {
      CHECK(e.rank == P - 1);
    }
  }
}

TEST_CASE("a Shard is checked against the config", "[tensor_parallel]") {
  LlamaFixture f = tiny(8, 4);
  TempDir dir;
  f.write(dir.path());
  const auto sum = [](llama::Matrix&) {};
  llama::Shard s;
  s.all_reduce = sum;
  s.first_head = 2, s.num_heads = 2, s.first_kv_head = 0, s.num_kv_heads = 1, s.num_intermediate = 24;
  CHECK_THROWS_WITH(llama::Model::load(dir.path(), s), Contains("[gqa.decoder.shard]") && Contains("query head 2 uses KV head 1"));
  s.first_kv_head = 1, s.num_intermediate = 25;
  CHECK_THROWS_WITH(llama::Model::load(dir.path(), s), Contains("[gqa.decoder.shard]") && Contains("intermediate_size = 24"));
  s.num_intermediate = 12;
  s.all_reduce = nullptr;
  CHECK_THROWS_WITH(llama::Model::load(dir.path(), s), Contains("needs an all_reduce"));
  s.all_reduce = sum;
  CHECK(llama::Model::load(dir.path(), s).layer(0).q.rows == 2 * f.d());
}
