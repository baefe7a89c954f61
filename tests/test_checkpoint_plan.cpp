// Tests of gqa/checkpoint_plan.hpp and the architecture rules (gqa/detail/checkpoint_rules.hpp), without touching
// the disk: every checkpoint here is an in-memory inventory (TinyModel::inventory()), so these tests also show that
// planning needs no file I/O. What the plan decides for each tensor and file, the summary it predicts, the checks of
// config.json against the shapes (overflow included), the messages in gqa-convert's terms, and a family whose config
// has no K/V head count (the BERT case of issue 13), which only needs a rules entry; BERT's rules; and what a method
// that reads the whole layer (fit) is handed.
#include "gqa/checkpoint_plan.hpp"

#include "support/checkpoint_fixtures.hpp"

#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace st = gqa::safetensors;
using Catch::Matchers::Contains;
using gqa::CheckpointPlan;
using gqa::Index;
using gqa::TensorAction;
using gqa::detail::TensorParam;
using gqa::detail::TensorRole;
using gqa_test::TinyModel;

gqa::CheckpointOptions with_kv_heads(Index kv_heads) {
  gqa::CheckpointOptions o;
  o.kv_heads = kv_heads;
  return o;
}

std::string plan_error(const gqa::CheckpointInventory& inv, const gqa::CheckpointOptions& o) {
  try {
    gqa::plan_checkpoint(inv, o);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "no error";
}

std::size_t find(const gqa::CheckpointInventory& inv, const std::string& name) {
  for (std::size_t i = 0; i < inv.tensors.size(); ++i)
    if (inv.tensors[i].name == name) return i;
  FAIL("no tensor " << name);
  return 0;
}

}  // namespace

TEST_CASE("plan_checkpoint: actions, shapes, files and summary of a pooling plan", "[checkpoint_plan]") {
  for (bool sharded : {false, true})
    for (Index kv_heads : {Index(8), Index(4), Index(1)}) {
      TinyModel m;  // H = G = 8, D = 4, hidden 32, 2 layers, bf16
      m.sharded = sharded;
      const auto inv = m.inventory();
      const CheckpointPlan p = gqa::plan_checkpoint(inv, with_kv_heads(kv_heads));
      INFO("sharded " << sharded << ", kv_heads " << kv_heads);
      REQUIRE(p.actions.size() == inv.tensors.size());
      std::size_t converted = 0;
      for (std::size_t i = 0; i < inv.tensors.size(); ++i) {
        const auto& t = inv.tensors[i];
        const TensorAction& a = p.actions[i];
        const bool kv = t.name.find("k_proj") != std::string::npos || t.name.find("v_proj") != std::string::npos;
        INFO(t.name);
        if (kv && kv_heads < 8) {
          CHECK(a.kind == TensorAction::pool);
          CHECK(a.shape_after == st::Shape{kv_heads * 4, 32});
          CHECK(a.kv_heads == kv_heads);
          CHECK(a.shape.heads == 8);
          CHECK(a.seed == gqa::detail::splitmix64(0 ^ gqa::detail::fnv1a64(t.name)));
          ++converted;
        } else {
          CHECK(a.kind == TensorAction::copy);
          CHECK(a.shape_after == t.shape);
        }
      }
      CHECK(converted == (kv_heads < 8 ? 4u : 0u));
      // Each file's tensors in natural order (layer 2 before layer 10 would matter with more layers).
      REQUIRE(p.file_order.size() == inv.files.size());
      for (const auto& order : p.file_order)
        for (std::size_t k = 1; k < order.size(); ++k)
          CHECK(gqa::detail::natural_less(inv.tensors[order[k - 1]].name, inv.tensors[order[k]].name));
      // The layer index hands a method the query and output projections of the layer it pools.
      REQUIRE(p.layers.size() == 2);
      for (Index layer = 0; layer < 2; ++layer) {
        const std::string prefix = "model.layers." + std::to_string(layer) + ".self_attn.";
        const auto& lt = p.layers[std::size_t(layer)];
        CHECK(lt.at(TensorRole::query, TensorParam::weight) == find(inv, prefix + "q_proj.weight"));
        CHECK(lt.at(TensorRole::key, TensorParam::weight) == find(inv, prefix + "k_proj.weight"));
        CHECK(lt.at(TensorRole::value, TensorParam::weight) == find(inv, prefix + "v_proj.weight"));
        CHECK(lt.at(TensorRole::output, TensorParam::weight) == find(inv, prefix + "o_proj.weight"));
        CHECK(lt.at(TensorRole::key, TensorParam::bias) == gqa::LayerTensors::none);
      }
      // Config and files.
      auto expected_config = m.config();
      expected_config["num_key_value_heads"] = kv_heads;
      CHECK(p.config_after == expected_config);
      CHECK(p.summary.files_copied ==
            std::vector<std::string>{"generation_config.json", "tokenizer.json", "tokenizer_config.json"});
      CHECK(p.summary.skipped == std::vector<std::string>{"original", "pytorch_model.bin"});
      std::vector<std::string> written = m.shard_files();
      if (sharded) written.push_back(st::index_file_name);
      written.push_back("config.json");
      CHECK(p.summary.files_written == written);
      // Summary, from shapes alone.
      const auto& s = p.summary;
      CHECK(s.kv_heads_before == 8);
      CHECK(s.kv_heads_after == kv_heads);
      CHECK(s.pooled == (kv_heads < 8));
      CHECK(s.query_order.empty());
      CHECK(s.layers == 2);
      CHECK(s.sharded == sharded);
      CHECK(s.tensors_total == inv.tensors.size());
      CHECK(s.tensors_converted == converted);
      CHECK(s.tensors_copied + s.tensors_converted == s.tensors_total);
      CHECK(s.tensor_bytes_before - s.tensor_bytes_after == 2 * 2 * std::uint64_t(8 - kv_heads) * 4 * 32 * 2);
      CHECK(s.kv_cache_bytes_per_token_before == 2 * 2 * 8 * 4 * 2);
      CHECK(s.kv_cache_bytes_per_token_after == 2 * 2 * std::uint64_t(kv_heads) * 4 * 2);
    }
}

TEST_CASE("plan_checkpoint: expansion, biases and a non-adjacent assignment", "[checkpoint_plan]") {
  TinyModel m;
  m.arch = TinyModel::Arch::qwen2;
  m.kv_heads = 4;
  m.head_dim = 6;
  const auto inv = m.inventory();
  const CheckpointPlan expand = gqa::plan_checkpoint(inv, with_kv_heads(8));
  const std::size_t kb = find(inv, "model.layers.1.self_attn.k_proj.bias");
  CHECK(expand.actions[kb].kind == TensorAction::expand);
  CHECK(expand.actions[kb].shape_after == st::Shape{8 * 6});
  CHECK(expand.actions[find(inv, "model.layers.1.self_attn.q_proj.bias")].kind == TensorAction::copy);
  CHECK_FALSE(expand.summary.pooled);

  auto o = with_kv_heads(2);
  o.convert.assignment = {0, 1, 0, 1};
  const CheckpointPlan strided = gqa::plan_checkpoint(inv, o);
  CHECK(strided.summary.query_order == gqa::query_head_order(8, 2, o.convert.assignment));
  CHECK(strided.summary.query_order != std::vector<Index>{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(strided.actions[find(inv, "model.layers.0.self_attn.q_proj.weight")].kind == TensorAction::permute_rows);
  CHECK(strided.actions[find(inv, "model.layers.0.self_attn.q_proj.bias")].kind == TensorAction::permute_rows);
  CHECK(strided.actions[find(inv, "model.layers.0.self_attn.o_proj.weight")].kind ==
        TensorAction::permute_columns);
  CHECK(strided.summary.tensors_converted == 2 * 7);  // q w/b, k w/b, v w/b, o w per layer
}

TEST_CASE("plan_checkpoint: config dimensions are checked against the shapes, overflow included",
          "[checkpoint_plan][errors]") {
  TinyModel m;
  auto inv = m.inventory();
  const auto good = inv.config;
  // Issue 11: head_dim or head counts near 2^60 overflowed the int64 shape products (a SIGSEGV in expand_heads, a
  // bad_alloc, or a reported success with the absurd value written out).
  const std::int64_t huge = std::int64_t(1) << 60;
  for (const char* field : {"head_dim", "num_attention_heads", "hidden_size"}) {
    inv.config = good;
    inv.config[field] = huge;
    if (std::string(field) == "num_attention_heads") {
      inv.config["num_key_value_heads"] = huge;
      inv.config["head_dim"] = 4;
    }
    INFO(field);
    CHECK_THAT(plan_error(inv, with_kv_heads(huge)), Contains("[gqa.checkpoint.config]") && Contains("overflows"));
  }
  // Large but representable values cannot pass either: the tensors' real shapes disagree.
  inv.config = good;
  inv.config["num_attention_heads"] = std::int64_t(1) << 40;
  inv.config["num_key_value_heads"] = std::int64_t(1) << 40;
  inv.config["head_dim"] = 4;
  CHECK_THAT(plan_error(inv, with_kv_heads(std::int64_t(1) << 40)),
             Contains("[gqa.checkpoint.shape]") && Contains("q_proj.weight"));
  // Without q_proj nothing would check num_attention_heads against a real size, so it is required.
  inv = m.inventory();
  inv.tensors.erase(inv.tensors.begin() + std::ptrdiff_t(find(inv, "model.layers.1.self_attn.q_proj.weight")));
  CHECK_THAT(plan_error(inv, with_kv_heads(8)), Contains("[gqa.checkpoint.shape]") && Contains("layer 1 has no query"));
  inv = m.inventory();
  inv.tensors[find(inv, "model.layers.0.self_attn.k_proj.weight")].dtype = st::Dtype::I8;
  CHECK_THAT(plan_error(inv, with_kv_heads(4)), Contains("[gqa.checkpoint.unsupported]") && Contains("I8"));
  inv = m.inventory();
  inv.config["num_hidden_layers"] = 3;
  CHECK_THAT(plan_error(inv, with_kv_heads(4)), Contains("[gqa.checkpoint.config]") && Contains("2 layers"));
}

TEST_CASE("plan_checkpoint: refusals speak gqa-convert's terms and list the valid values", "[checkpoint_plan][errors]") {
  TinyModel m;
  m.kv_heads = 4;
  m.heads = 8;
  const auto inv = m.inventory();
  CHECK_THAT(plan_error(inv, with_kv_heads(3)), Contains("[gqa.checkpoint.groups]") && Contains("--groups = 3") &&
                                                    Contains("one of 1, 2, 4, 8"));
  CHECK_THAT(plan_error(inv, with_kv_heads(0)), Contains("--groups = 0") && Contains("one of 1, 2, 4, 8"));
  auto o = with_kv_heads(2);
  o.convert.assignment = {0, 0, 0, 1};
  CHECK_THAT(plan_error(inv, o), Contains("--assignment"));
  o = with_kv_heads(8);
  o.convert.assignment = {0, 1, 2, 3};
  CHECK_THAT(plan_error(inv, o), Contains("--assignment applies to pooling only"));

  TinyModel gpt2;
  gpt2.arch = TinyModel::Arch::gpt2;
  CHECK_THAT(plan_error(gpt2.inventory(), with_kv_heads(1)), Contains("fused QKV"));
  TinyModel qwen3;
  qwen3.arch = TinyModel::Arch::qwen3;
  CHECK_THAT(plan_error(qwen3.inventory(), with_kv_heads(1)), Contains("per-head query/key norm"));
  auto flagged = m.inventory();
  flagged.config["use_qk_norm"] = true;
  CHECK_THAT(plan_error(flagged, with_kv_heads(1)), Contains("use_qk_norm"));
  auto no_attention = m.inventory();
  no_attention.tensors.erase(std::remove_if(no_attention.tensors.begin(), no_attention.tensors.end(),
                                            [](const auto& t) { return t.name.find("self_attn") != std::string::npos; }),
                             no_attention.tensors.end());
  CHECK_THAT(plan_error(no_attention, with_kv_heads(1)),
             Contains("[gqa.checkpoint.unsupported]") && Contains("self_attn.k_proj.weight"));
}

TEST_CASE("plan_checkpoint: a family without a K/V head count is written expanded back, config unchanged",
          "[checkpoint_plan]") {
  // Llama's names with BERT's config semantics: what issue 13's BERT support adds, as rules only.
  gqa::detail::ArchitectureRules mha_only = gqa::detail::architectures().back();
  mha_only.family = "MHA-only";
  mha_only.fields.kv_heads = nullptr;
  TinyModel m;
  m.write_kv_heads = false;
  const auto inv = m.inventory();
  const CheckpointPlan p = gqa::plan_checkpoint(inv, with_kv_heads(2), mha_only);
  const TensorAction& k = p.actions[find(inv, "model.layers.0.self_attn.k_proj.weight")];
  CHECK(k.kind == TensorAction::pool);
  CHECK(k.expand_back);
  CHECK(k.kv_heads == 2);
  CHECK(k.shape_after == st::Shape{8 * 4, 32});
  CHECK(p.config_after == inv.config);
  CHECK(p.summary.written_expanded);
  CHECK(p.summary.kv_heads_after == 2);
  CHECK(p.summary.tensor_bytes_after == p.summary.tensor_bytes_before);
  CHECK(p.summary.kv_cache_bytes_per_token_after == p.summary.kv_cache_bytes_per_token_before);
  // G' = H changes nothing.
  const CheckpointPlan same = gqa::plan_checkpoint(inv, with_kv_heads(8), mha_only);
  for (const auto& a : same.actions) CHECK(a.kind == TensorAction::copy);
}

TEST_CASE("checkpoint rules: names, layers and roles", "[checkpoint_plan]") {
  using gqa::detail::classify_llama;
  const auto k = classify_llama("model.layers.12.self_attn.k_proj.bias");
  REQUIRE(k);
  CHECK(k->layer == 12);
  CHECK(k->role == TensorRole::key);
  CHECK(k->param == TensorParam::bias);
  CHECK(classify_llama("model.layers.0.self_attn.o_proj.weight")->role == TensorRole::output);
  for (const char* name : {"model.layers.01.self_attn.k_proj.weight", "model.layers.1234567890.self_attn.q_proj.weight",
                           "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.lora_A",
                           "model.layers..self_attn.k_proj.weight", "layers.1.self_attn.k_proj.weight"})
    CHECK_FALSE(classify_llama(name).has_value());
}

TEST_CASE("plan_checkpoint: fit hands each layer's q, k, v, o and input norm to one pool_attention",
          "[checkpoint_plan][fit]") {
  TinyModel m;  // Llama: no biases, input_layernorm.weight per layer
  const auto inv = m.inventory();
  gqa::CheckpointOptions o = with_kv_heads(2);
  o.convert.method = gqa::PoolMethod::fit;
  const CheckpointPlan p = gqa::plan_checkpoint(inv, o);
  CHECK(p.summary.method == gqa::PoolMethod::fit);
  REQUIRE(p.layers.size() == 2);
  for (Index l = 0; l < 2; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    INFO(pre);
    CHECK(p.layers[l].norm[0] == find(inv, pre + "input_layernorm.weight"));
    CHECK(p.layers[l].norm[1] == gqa::LayerTensors::none);
    for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
      const TensorAction& a = p.actions[find(inv, pre + "self_attn." + proj + ".weight")];
      INFO(proj);
      CHECK(a.from_layer);
      CHECK(a.layer == l);
      const bool kv = proj[0] == 'k' || proj[0] == 'v';
      CHECK(a.kind == (kv ? TensorAction::pool : TensorAction::refit));
    }
    CHECK_FALSE(p.actions[find(inv, pre + "input_layernorm.weight")].from_layer);
    CHECK(p.actions[find(inv, pre + "input_layernorm.weight")].kind == TensorAction::copy);
  }
  CHECK(p.summary.tensors_converted == 8);
  // auto: mean for a rotary (Llama-family) checkpoint, so nothing but K/V is touched.
  o.convert.method = gqa::PoolMethod::automatic;
  const CheckpointPlan a = gqa::plan_checkpoint(inv, o);
  CHECK(a.summary.method == gqa::PoolMethod::mean);
  for (const auto& act : a.actions) CHECK_FALSE(act.from_layer);
  CHECK(a.summary.tensors_converted == 4);
  // Not pooling: the method does not matter, nothing is refitted.
  o.kv_heads = 8;
  o.convert.method = gqa::PoolMethod::fit;
  for (const auto& act : gqa::plan_checkpoint(inv, o).actions) CHECK(act.kind == TensorAction::copy);
}

TEST_CASE("plan_checkpoint: fit refuses a layer it cannot compute in one dtype, or without an output projection",
          "[checkpoint_plan][fit][errors]") {
  TinyModel m;
  gqa::CheckpointOptions o = with_kv_heads(2);
  o.convert.method = gqa::PoolMethod::fit;
  auto inv = m.inventory();
  inv.tensors[find(inv, "model.layers.1.input_layernorm.weight")].dtype = st::Dtype::F32;  // the rest is bf16
  CHECK_THAT(plan_error(inv, o), Contains("[gqa.checkpoint.unsupported]") &&
                                     Contains("model.layers.1.input_layernorm.weight' has dtype F32") &&
                                     Contains("--method fit"));
  CHECK_NOTHROW(gqa::plan_checkpoint(inv, with_kv_heads(2)));  // mean reads K/V only
  inv = m.inventory();
  inv.tensors.erase(inv.tensors.begin() + static_cast<std::ptrdiff_t>(find(inv, "model.layers.0.self_attn.o_proj.weight")));
  CHECK_THAT(plan_error(inv, o), Contains("[gqa.checkpoint.unsupported]") && Contains("layer 0 has none"));
}

TEST_CASE("plan_checkpoint: fit is refused, by field and value, where the rotary embedding is partial or missing",
          "[checkpoint_plan][fit][errors]") {
  // Issue 24 row 15: fit's rotary pairing assumed every dimension of every layer rotates.
  TinyModel m;  // Llama, 2 layers, head_dim 4
  gqa::CheckpointOptions fit = with_kv_heads(2);
  fit.convert.method = gqa::PoolMethod::fit;
  const auto base = m.inventory();
  REQUIRE(plan_error(base, fit) == "no error");
  struct Form {
    const char* what;
    nlohmann::ordered_json patch;
    std::vector<std::string> named;
  };
  const std::vector<Form> refused = {
      {"top-level partial_rotary_factor", {{"partial_rotary_factor", 0.5}},
       {"\"partial_rotary_factor\" = 0.5", "rotary on 2 of each head's 4 dimensions"}},
      {"inside rope_parameters, as transformers 5 saves it",
       {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 10000.0}, {"partial_rotary_factor", 0.25}}}},
       {"\"rope_parameters.partial_rotary_factor\" = 0.25"}},
      {"inside rope_scaling", {{"rope_scaling", {{"rope_type", "linear"}, {"factor", 2.0}, {"partial_rotary_factor", 0.5}}}},
       {"\"rope_scaling.partial_rotary_factor\" = 0.5"}},
      {"per layer type inside rope_parameters",
       {{"rope_parameters", {{"full_attention", {{"rope_type", "default"}, {"partial_rotary_factor", 0.5}}}}}},
       {"\"rope_parameters.full_attention.partial_rotary_factor\" = 0.5"}},
      {"a factor that is not a number", {{"partial_rotary_factor", "half"}}, {"\"partial_rotary_factor\" = \"half\""}},
      {"rotary_dim below head_dim", {{"rotary_dim", 2}}, {"\"rotary_dim\" = 2", "head_dim is 4"}},
      {"SmolLM3's no_rope_layers", {{"model_type", "smollm3"}, {"no_rope_layers", {1, 0}}},
       {"\"no_rope_layers\"[1] = 0", "layer 1 has no rotary embedding"}},
      {"no_rope_layer_interval without the list", {{"no_rope_layer_interval", 2}},
       {"\"no_rope_layer_interval\" = 2"}},
      {"smollm3 with no_rope_layer_interval 1", {{"model_type", "smollm3"}, {"no_rope_layer_interval", 1}},
       {"\"no_rope_layer_interval\" = 1"}},
  };
  for (const Form& f : refused) {
    INFO(f.what);
    auto inv = base;
    for (const auto& [key, value] : f.patch.items()) inv.config[key] = value;
    const std::string error = plan_error(inv, fit);
    CHECK_THAT(error, Contains("[gqa.checkpoint.unsupported]") && Contains("--method fit") &&
                          Contains("every dimension of every layer"));
    for (const auto& n : f.named) CHECK_THAT(error, Contains(n));
    // mean, first and random pool whole heads: unaffected. auto means mean for a rotary family.
    for (auto method : {gqa::PoolMethod::mean, gqa::PoolMethod::first, gqa::PoolMethod::random,
                        gqa::PoolMethod::automatic}) {
      gqa::CheckpointOptions o = with_kv_heads(2);
      o.convert.method = method;
      CHECK(plan_error(inv, o) == "no error");
    }
  }
  // Full rotary said explicitly, and NoPE settings that leave every layer rotary, are fit as before.
  const std::vector<nlohmann::ordered_json> accepted = {
      {{"partial_rotary_factor", 1.0}},
      {{"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 100000.0}}}},
      {{"rotary_dim", 4}},
      {{"model_type", "smollm3"}, {"no_rope_layers", {1, 1}}},
      {{"model_type", "smollm3"}, {"num_hidden_layers", 2}},  // transformers' default interval 4 > 2 layers
      {{"partial_rotary_factor", nullptr}},
  };
  for (const auto& patch : accepted) {
    INFO(patch.dump());
    auto inv = base;
    for (const auto& [key, value] : patch.items()) inv.config[key] = value;
    CHECK(plan_error(inv, fit) == "no error");
  }
  // SmolLM3 without the list: transformers' default interval 4 leaves layer 3 of 4 without rotary.
  TinyModel four;
  four.layers = 4;
  auto inv4 = four.inventory();
  inv4.config["model_type"] = "smollm3";
  CHECK_THAT(plan_error(inv4, fit), Contains("\"model_type\" = \"smollm3\" without \"no_rope_layers\"") &&
                                        Contains("multiple of 4"));
  // Only pooling uses the method: the same config expanded (G' > G) plans with fit.
  auto inv = base;
  inv.config["partial_rotary_factor"] = 0.5;
  gqa::CheckpointOptions expand = fit;
  expand.kv_heads = 8;
  CHECK(plan_error(inv, expand) == "no error");
}

TEST_CASE("checkpoint rules: BERT names, input norms, recognition and refusals", "[checkpoint_plan][bert]") {
  using gqa::detail::bert_input_norm;
  using gqa::detail::classify_bert;
  for (const char* prefix : {"", "bert."}) {
    const std::string p = prefix;
    const auto k = classify_bert(p + "encoder.layer.3.attention.self.key.bias");
    REQUIRE(k);
    CHECK(k->layer == 3);
    CHECK(k->role == TensorRole::key);
    CHECK(k->param == TensorParam::bias);
    CHECK(classify_bert(p + "encoder.layer.0.attention.self.query.weight")->role == TensorRole::query);
    CHECK(classify_bert(p + "encoder.layer.0.attention.self.value.weight")->role == TensorRole::value);
    const auto o = classify_bert(p + "encoder.layer.11.attention.output.dense.weight");
    REQUIRE(o);
    CHECK(o->role == TensorRole::output);
    CHECK(o->layer == 11);
    CHECK(bert_input_norm(p + "embeddings.LayerNorm.weight") == std::make_pair(Index(0), TensorParam::weight));
    CHECK(bert_input_norm(p + "encoder.layer.4.output.LayerNorm.bias") == std::make_pair(Index(5), TensorParam::bias));
  }
  for (const char* name : {"encoder.layer.0.attention.output.LayerNorm.weight", "encoder.layer.0.output.dense.weight",
                           "encoder.layer.0.intermediate.dense.weight", "encoder.layer.00.attention.self.key.weight",
                           "roberta.encoder.layer.0.attention.self.key.weight", "encoder.layer.0.attention.self.key"})
    CHECK_FALSE(classify_bert(name).has_value());
  CHECK_FALSE(bert_input_norm("encoder.layer.0.attention.output.LayerNorm.weight").has_value());

  const auto& bert = gqa::detail::rules_for(TinyModel{TinyModel::Arch::bert}.config());
  CHECK(std::string(bert.family) == "BERT");
  CHECK(bert.rotary == gqa::RotaryPairs::none);
  CHECK(std::string(gqa::detail::rules_for(nlohmann::ordered_json{{"architectures", {"BertForMaskedLM"}}}).family) ==
        "BERT");
  CHECK(std::string(gqa::detail::rules_for(TinyModel{}.config()).family) == "Llama/Mistral/Qwen2");
  CHECK(gqa::detail::rules_for(TinyModel{}.config()).rotary == gqa::RotaryPairs::half_split);
  CHECK_THAT(*bert.refusal("encoder.layer.0.attention.self.distance_embedding.weight"),
             Contains("relative position embeddings"));
  CHECK_THAT(*bert.refusal("encoder.layer.0.crossattention.self.key.weight"), Contains("cross-attention"));
  CHECK_THAT(*bert.refusal("encoder.layer.0.attention.self.qkv.weight"), Contains("fused QKV"));
  CHECK_FALSE(bert.refusal("encoder.layer.0.attention.self.key.weight").has_value());
}

TEST_CASE("plan_checkpoint: a BERT checkpoint is pooled and written expanded back; mismatches are refused",
          "[checkpoint_plan][bert]") {
  TinyModel m;
  m.arch = TinyModel::Arch::bert;  // H = 8, D = 4, hidden 32, 2 layers
  const auto inv = m.inventory();
  for (auto method : {gqa::PoolMethod::mean, gqa::PoolMethod::automatic}) {
    gqa::CheckpointOptions o = with_kv_heads(2);
    o.convert.method = method;
    const CheckpointPlan p = gqa::plan_checkpoint(inv, o);
    INFO(gqa::to_string(method));
    CHECK(std::string(p.rules->family) == "BERT");
    CHECK(p.summary.written_expanded);
    CHECK(p.summary.method == (method == gqa::PoolMethod::mean ? gqa::PoolMethod::mean : gqa::PoolMethod::fit));
    CHECK(p.config_after == inv.config);
    CHECK(p.summary.tensor_bytes_after == p.summary.tensor_bytes_before);
    const TensorAction& k = p.actions[find(inv, "encoder.layer.1.attention.self.key.bias")];
    CHECK(k.kind == TensorAction::pool);
    CHECK(k.expand_back);
    CHECK(k.shape_after == st::Shape{32});
    CHECK(p.layers[1].norm[0] == find(inv, "encoder.layer.0.output.LayerNorm.weight"));
    CHECK(p.layers[1].norm[1] == find(inv, "encoder.layer.0.output.LayerNorm.bias"));
    CHECK(p.layers[0].norm[1] == find(inv, "embeddings.LayerNorm.bias"));
    const auto& bo = p.actions[find(inv, "encoder.layer.0.attention.output.dense.bias")];
    CHECK(bo.kind == (method == gqa::PoolMethod::mean ? TensorAction::copy : TensorAction::refit));
  }
  // K/V shapes that disagree with the config (which has no K/V head count: G = H).
  TinyModel bad = m;
  bad.kv_heads = 4;
  CHECK_THAT(plan_error(bad.inventory(), with_kv_heads(2)),
             Contains("[gqa.checkpoint.shape]") && Contains("encoder.layer.0.attention.self.key") &&
                 Contains("has shape [16") && Contains("implies [32"));
  // Relative position embeddings are refused from the config.
  auto rel = m.inventory();
  rel.config["position_embedding_type"] = "relative_key_query";
  CHECK_THAT(plan_error(rel, with_kv_heads(2)),
             Contains("[gqa.checkpoint.unsupported]") && Contains("relative_key_query"));
  // An unknown architecture is still refused clearly.
  TinyModel gpt2;
  gpt2.arch = TinyModel::Arch::gpt2;
  CHECK_THAT(plan_error(gpt2.inventory(), with_kv_heads(2)), Contains("fused QKV"));
}
