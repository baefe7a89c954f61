// gqa/errors.hpp — the exceptions gqa throws, and the table of their stable ids.
//
// Every check happens once, at the public API, and throws a typed exception whose message names the argument,
// the dimension or field, and the values involved, prefixed by a stable id, e.g.
//   "[gqa.shape] k: dim 2 (kv_heads G) = 5 does not divide q dim 2 (heads H) = 32"
// e.id() returns that id without the brackets ("gqa.shape"): match on it, never on the rest of the message, which
// may be reworded. gqa::error_ids below lists every id gqa throws and what it means (tests/test_errors.cpp checks
// that every id in include/ is listed, and that every listed id is used).
// Hierarchy:
//   gqa::invalid_argument : std::invalid_argument    bad arguments (shapes, options, values)
//     gqa::shape_error                               tensor shapes that disagree
//   gqa::format_error : std::runtime_error           a malformed file (safetensors header, config.json)
//   gqa::io_error : std::runtime_error               the operating system refused (open, mmap, write, rename)
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace gqa {

/// One row of the id table: the id as e.id() returns it, the exception type(s) that carry it, and its meaning.
struct ErrorId {
  std::string_view id;
  std::string_view thrown_as;
  std::string_view meaning;
};

// clang-format off
/// Every stable id gqa throws. Adding a check with a new id means adding its row here (test_errors fails otherwise).
inline constexpr ErrorId error_ids[] = {
  // Attention (gqa/attention.hpp, gqa/reference.hpp) and the shared shape checks of gqa/convert.hpp
  {"gqa.shape",  "shape_error",      "tensor shapes disagree: G does not divide H, B / Sk / D differ between q, k, v "
                                     "and out, a bias or lse of the wrong size, a non-positive head count or dim, "
                                     "or a compile-time group size that is not H/G"},
  {"gqa.stride", "shape_error",      "a tensor's last (head_dim) stride is not 1"},
  {"gqa.null",   "invalid_argument", "a non-empty tensor has a null data pointer"},
  {"gqa.alias",  "invalid_argument", "out overlaps k, v, the bias, lse, or q other than exactly (out may be q)"},
  {"gqa.option", "invalid_argument", "an AttentionOptions field out of range (window, softcap, scale, num_threads, "
                                     "key_lengths), or key_lengths set for a KVCache, which supplies its own"},
  // KV cache (gqa/kv_cache.hpp)
  {"gqa.kv_cache",          "shape_error, invalid_argument", "a non-positive KVCache size, appended K/V whose "
                                     "shape disagrees with the cache, or counts / truncate arguments out of range"},
  {"gqa.kv_cache_overflow", "invalid_argument", "an append would take a sequence past the cache's capacity"},
  {"gqa.kv_cache_nonfinite", "invalid_argument", "an append to an int8, half or bfloat16 KVCache holds NaN or "
                                     "inf, which those caches do not store"},
  {"gqa.kv_cache_range",    "invalid_argument", "an appended value is finite but beyond the cache type's range (above "
                                     "65504 for half; a double beyond float range for float and int8): it would be "
                                     "stored as inf"},
  // Paged KV cache (gqa/paged_kv_cache.hpp); its appends also refuse values as KVCache does (kv_cache_nonfinite,
  // kv_cache_range)
  {"gqa.paged_kv_cache",      "shape_error, invalid_argument", "a non-positive PagedKVCache size, a sequence id "
                                     "that is not live (or twice in one append), appended K/V whose shape "
                                     "disagrees with the cache, or counts / truncate arguments out of range"},
  {"gqa.paged_kv_cache_full", "invalid_argument", "an append needs more blocks than the pool has free"},
  // Conversion math (gqa/convert.hpp)
  {"gqa.convert.assignment", "invalid_argument", "ConvertOptions::assignment is not a partition of the H heads "
                                     "into G groups of H/G"},
  {"gqa.convert.method",     "invalid_argument", "ConvertOptions::method is not a PoolMethod"},
  {"gqa.convert.nonfinite",  "invalid_argument", "pool_attention: a weight or bias is NaN or infinite"},
  {"gqa.convert.order",      "invalid_argument", "permute_heads: the order is not a permutation of the heads"},
  // safetensors files (gqa/safetensors.hpp): reading, validated field by field
  {"gqa.safetensors.truncated",      "format_error", "the file is shorter than the 8-byte header length"},
  {"gqa.safetensors.header_length",  "format_error", "the header length runs past the file or exceeds 100 MB"},
  {"gqa.safetensors.header_json",    "format_error", "the header is not valid JSON, or nests too deep"},
  {"gqa.safetensors.header_object",  "format_error", "the header is JSON but not an object"},
  {"gqa.safetensors.duplicate",      "format_error, invalid_argument", "a key appears twice in a header object, or "
                                     "the Writer is given a tensor name twice"},
  {"gqa.safetensors.metadata",       "format_error", "\"__metadata__\" is not an object of strings"},
  {"gqa.safetensors.entry",          "format_error", "a tensor entry is not an object or lacks dtype, shape or "
                                     "data_offsets"},
  {"gqa.safetensors.dtype",          "format_error", "an unknown dtype name"},
  {"gqa.safetensors.shape",          "format_error, shape_error", "a shape that is not non-negative integers, or "
                                     "whose byte size overflows (when reading or writing)"},
  {"gqa.safetensors.offsets",        "format_error", "data_offsets is not [begin, end] with begin <= end"},
  {"gqa.safetensors.size_mismatch",  "format_error, invalid_argument", "shape x dtype size differs from the byte "
                                     "range (read) or from the data given (write)"},
  {"gqa.safetensors.out_of_bounds",  "format_error", "a tensor's byte range ends past the buffer"},
  {"gqa.safetensors.overlap",        "format_error", "two tensors' byte ranges overlap"},
  {"gqa.safetensors.gap",            "format_error", "the byte ranges leave a hole"},
  {"gqa.safetensors.trailing_bytes", "format_error", "the byte ranges do not reach the end of the buffer"},
  {"gqa.safetensors.index",          "format_error", "model.safetensors.index.json is malformed or disagrees with "
                                     "its shards"},
  // safetensors: using what was read, and writing
  {"gqa.safetensors.not_found", "invalid_argument", "no tensor of that name"},
  {"gqa.safetensors.as",        "invalid_argument", "TensorView::as<T> with a T that is not the tensor's dtype"},
  {"gqa.safetensors.alignment", "invalid_argument", "TensorView::as<T> on data not aligned for T (use to_vector)"},
  {"gqa.safetensors.name",      "invalid_argument", "a tensor named \"__metadata__\" (reserved)"},
  {"gqa.safetensors.producer",  "invalid_argument", "Writer::add with an empty producer function"},
  // Checkpoint conversion (gqa/checkpoint.hpp, the gqa-convert tool)
  {"gqa.checkpoint.config",        "format_error", "config.json is missing, not JSON, or has a missing or invalid "
                                     "field"},
  {"gqa.checkpoint.shape",         "format_error", "the checkpoint's K/V tensors are missing or disagree with "
                                     "config.json"},
  {"gqa.checkpoint.groups",        "invalid_argument", "the requested groups (--groups) is not a valid number of "
                                     "KV heads for this checkpoint"},
  {"gqa.checkpoint.output_exists", "invalid_argument", "the output directory exists and force (--force) is off"},
  {"gqa.checkpoint.path",         "invalid_argument", "INPUT_DIR or OUTPUT_DIR is an empty path"},
  {"gqa.checkpoint.interrupted",  "io_error", "the conversion was cancelled (SIGINT / SIGTERM in gqa-convert); "
                                     "nothing was left behind"},
  {"gqa.checkpoint.unsupported",   "invalid_argument", "an architecture the conversion refuses: fused QKV, "
                                     "per-head q/k norms, quantised or non-float K/V, no k_proj"},
  // Attention across MPI ranks (gqa/distributed.hpp, target gqa::mpi)
  {"gqa.distributed.ranks",  "invalid_argument", "a rank count P that cannot split the heads (head_shard: P must "
                                     "divide H, and P divide G or G divide P), or a rank outside [0, P)"},
  {"gqa.distributed.shape",  "shape_error", "a rank's tensors disagree with its shard or ring layout, a value that "
                                     "must be the same on every rank differs, or a message too large for MPI"},
  {"gqa.distributed.option", "invalid_argument", "an AttentionOptions field a distributed call does not support "
                                     "(window, bias, key_lengths; causal decode with Sq > 1)"},
  {"gqa.distributed.peer",   "invalid_argument", "thrown on the other ranks when one rank's arguments were refused, "
                                     "so that every rank leaves the collective call together"},
  {"gqa.distributed.mpi",    "io_error", "an MPI call returned an error (with an error handler that returns)"},
  // The operating system
  {"gqa.io", "io_error", "the operating system refused: open, stat, mmap, write, fsync, rename, a missing file"},
};
// clang-format on

/// The row of `id` ("gqa.shape") in error_ids, or nullptr.
constexpr const ErrorId* find_error_id(std::string_view id) noexcept {
  for (const ErrorId& e : error_ids)
    if (e.id == id) return &e;
  return nullptr;
}

namespace detail {

/// The id at the front of an exception message: "[gqa.shape] ..." -> "gqa.shape"; "" when there is none.
inline std::string_view error_id_of(const char* what) noexcept {
  const std::string_view s(what);
  if (s.substr(0, 5) != "[gqa.") return {};
  const std::size_t end = s.find(']');
  return end == std::string_view::npos ? std::string_view{} : s.substr(1, end - 1);
}

}  // namespace detail

// Each class reads its id back from what(): the message is the one place it is stored, so an exception built by
// hand with the "[gqa.<id>] " prefix has an id() too.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
  /// The stable id, e.g. "gqa.shape" (see gqa::error_ids).
  std::string_view id() const noexcept { return detail::error_id_of(what()); }
};

class shape_error : public invalid_argument {
 public:
  using invalid_argument::invalid_argument;
};

class format_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  /// The stable id, e.g. "gqa.safetensors.header_json" (see gqa::error_ids).
  std::string_view id() const noexcept { return detail::error_id_of(what()); }
};

class io_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  /// The stable id, "gqa.io" or "gqa.checkpoint.interrupted" (see gqa::error_ids).
  std::string_view id() const noexcept { return detail::error_id_of(what()); }
};

namespace detail {

template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws E("[gqa.<id>] " + message pieces) when `condition` is false.
template <typename E = invalid_argument, typename... Args>
void require(bool condition, const char* id, Args&&... message) {
  if (!condition) throw E(concat("[gqa.", id, "] ", std::forward<Args>(message)...));
}

}  // namespace detail
}  // namespace gqa
