// gqa/safetensors.hpp — read (memory-mapped, zero copy) and write (atomic) safetensors files, sharded checkpoints
// included. POSIX only (mmap, mkstemp, rename); little-endian hosts only, like the format.
//
// THE FORMAT (https://github.com/huggingface/safetensors), field by field
//
//   offset   size  field
//   0        8     N, the header length: unsigned 64-bit little-endian integer
//   8        N     the header: a UTF-8 JSON object with one entry per tensor and an optional "__metadata__":
//                    {
//                      "__metadata__": {"format": "pt"},                 optional; string -> string only
//                      "model.embed_tokens.weight": {
//                        "dtype": "BF16",                                one of the dtypes below
//                        "shape": [32000, 4096],                         non-negative integers; [] is a scalar
//                        "data_offsets": [0, 262144000]                  [begin, end) in the byte buffer
//                      },
//                      ...
//                    }
//                  By convention the header is padded with spaces (0x20) so that 8 + N is a multiple of 8, which
//                  keeps every tensor aligned when tensors are laid out largest dtype first.
//   8 + N    ...   the byte buffer: tensor data, row-major (last index fastest), little-endian. Offsets are
//                  relative to the start of the buffer (byte 8 + N of the file).
//
//   dtype  bytes  C++ type (TensorView::as<T>)      dtype    bytes  C++ type
//   F64    8      double                            I64      8      std::int64_t
//   F32    4      float                             I32      4      std::int32_t
//   F16    2      gqa::half (IEEE binary16)         I16      2      std::int16_t
//   BF16   2      gqa::bfloat16                     I8       1      std::int8_t
//   U64    8      std::uint64_t                     U8       1      std::uint8_t
//   U32    4      std::uint32_t                     BOOL     1      std::uint8_t (0 or 1; never read as bool)
//   U16    2      std::uint16_t                     F8_E5M2, F8_E4M3  1  raw bytes only (no typed access)
//
// WHAT A READER CHECKS before it trusts a byte, each failure a gqa::format_error with a stable id:
//   [gqa.safetensors.truncated]       the file is shorter than the 8-byte length field
//   [gqa.safetensors.header_length]   N > file size - 8, or N > 100'000'000 (the limit of Hugging Face's reader)
//   [gqa.safetensors.header_json]     the header is not valid JSON (or nests deeper than a header ever needs)
//   [gqa.safetensors.header_object]   the header is valid JSON but not an object
//   [gqa.safetensors.duplicate]       a tensor name (or any key of an object) appears twice; plain JSON parsers
//                                     silently keep one of them, so it is rejected explicitly
//   [gqa.safetensors.metadata]        "__metadata__" is not an object of string values
//   [gqa.safetensors.entry]           an entry is not an object, or lacks "dtype", "shape" or "data_offsets", or
//                                     "dtype" is not a string (unknown extra fields are ignored, as HF does)
//   [gqa.safetensors.dtype]           a dtype name not in the table above
//   [gqa.safetensors.shape]           shape is not an array of non-negative integers, or its byte size overflows
//   [gqa.safetensors.offsets]         data_offsets is not [begin, end] of non-negative integers with begin <= end
//   [gqa.safetensors.size_mismatch]   product(shape) * dtype size != end - begin
//   [gqa.safetensors.out_of_bounds]   end > buffer size
//   [gqa.safetensors.overlap]         two tensors' byte ranges overlap
//   [gqa.safetensors.gap]             the ranges, sorted by begin, leave a hole (HF: "InvalidOffset")
//   [gqa.safetensors.trailing_bytes]  the ranges do not reach the end of the buffer (HF: "MetadataIncompleteBuffer")
//   [gqa.io] (gqa::io_error)           the OS refused (the message names the call and its errno), or the path is
//                                     not a regular file: a FIFO or device is refused at once, never waited on
// The ranges must therefore tile the buffer exactly, as Hugging Face's reader demands. The order of the entries in
// the JSON object is irrelevant (JSON objects are unordered); only the ranges are checked.
//
// WHAT THE WRITER PRODUCES: header with "__metadata__" ({"format": "pt"} unless told otherwise) first and then the
// tensors in data order, padded with spaces to a multiple of 8; tensors laid out contiguously, ordered by dtype size
// (largest first, so each tensor is aligned to its element size) and otherwise in the order they were added. The
// file is written to a temporary file in the destination's directory, fsync'ed and renamed into place, so the
// destination is either the old file or the complete new one. Header parsing and writing take time linear in the
// number of tensors.
//
// SHARDED CHECKPOINTS: model.safetensors.index.json is
//   {"metadata": {"total_size": <sum of tensor byte sizes>, ...}, "weight_map": {"<tensor>": "<shard file>", ...}}
// Directory::open(dir) reads either that index and its shards, or a single model.safetensors; it checks that every
// tensor the index names is in its shard, that every shard tensor is named by the index, and that shard names are
// plain file names inside the directory ([gqa.safetensors.index]).
//
// Lifetimes: a TensorView's bytes point into its File's mapping and are valid while the File (or the Directory
// holding it) lives; moving a File keeps them valid.
#pragma once

#define GQA_DETAIL_ALLOWED  // the detail headers below check it (gqa/detail/internal_header_check.hpp)
#include "gqa/detail/safetensors_io.hpp"
#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <ostream>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gqa/safetensors.hpp: safetensors data is little-endian; big-endian hosts are not supported"
#endif

namespace gqa::safetensors {

/// Element types of the format.
enum class Dtype : std::uint8_t { BOOL, U8, I8, F8_E5M2, F8_E4M3, I16, U16, F16, BF16, I32, U32, F32, I64, U64, F64 };

/// Bytes per element.
constexpr std::size_t dtype_size(Dtype d) noexcept {
  switch (d) {
    case Dtype::BOOL: case Dtype::U8: case Dtype::I8: case Dtype::F8_E5M2: case Dtype::F8_E4M3: return 1;
    case Dtype::I16: case Dtype::U16: case Dtype::F16: case Dtype::BF16: return 2;
    case Dtype::I32: case Dtype::U32: case Dtype::F32: return 4;
    case Dtype::I64: case Dtype::U64: case Dtype::F64: return 8;
  }
  return 0;
}

namespace detail {
struct DtypeName {
  Dtype dtype;
  std::string_view name;
};
inline constexpr std::array<DtypeName, 15> dtype_names{{
    {Dtype::BOOL, "BOOL"}, {Dtype::U8, "U8"}, {Dtype::I8, "I8"}, {Dtype::F8_E5M2, "F8_E5M2"},
    {Dtype::F8_E4M3, "F8_E4M3"}, {Dtype::I16, "I16"}, {Dtype::U16, "U16"}, {Dtype::F16, "F16"},
    {Dtype::BF16, "BF16"}, {Dtype::I32, "I32"}, {Dtype::U32, "U32"}, {Dtype::F32, "F32"}, {Dtype::I64, "I64"},
    {Dtype::U64, "U64"}, {Dtype::F64, "F64"},
}};
}  // namespace detail

/// The name used in headers ("BF16", ...).
constexpr std::string_view dtype_name(Dtype d) noexcept {
  for (const auto& e : detail::dtype_names)
    if (e.dtype == d) return e.name;
  return "?";
}

/// The dtype a header name denotes, or nullopt for names the format does not define.
inline std::optional<Dtype> parse_dtype(std::string_view name) noexcept {
  for (const auto& e : detail::dtype_names)
    if (e.name == name) return e.dtype;
  return std::nullopt;
}

/// The dtype of a C++ element type (the table in the header comment); BOOL is read and written as std::uint8_t.
template <typename T>
constexpr Dtype dtype_of() noexcept {
  using U = std::remove_cv_t<T>;
  static_assert(std::is_same_v<U, double> || std::is_same_v<U, float> || std::is_same_v<U, half> ||
                    std::is_same_v<U, bfloat16> || std::is_same_v<U, std::int64_t> ||
                    std::is_same_v<U, std::int32_t> || std::is_same_v<U, std::int16_t> ||
                    std::is_same_v<U, std::int8_t> || std::is_same_v<U, std::uint64_t> ||
                    std::is_same_v<U, std::uint32_t> || std::is_same_v<U, std::uint16_t> ||
                    std::is_same_v<U, std::uint8_t>,
                "gqa::safetensors: no dtype for this C++ type (bool: use std::uint8_t)");
  if constexpr (std::is_same_v<U, double>) return Dtype::F64;
  else if constexpr (std::is_same_v<U, float>) return Dtype::F32;
  else if constexpr (std::is_same_v<U, half>) return Dtype::F16;
  else if constexpr (std::is_same_v<U, bfloat16>) return Dtype::BF16;
  else if constexpr (std::is_same_v<U, std::int64_t>) return Dtype::I64;
  else if constexpr (std::is_same_v<U, std::int32_t>) return Dtype::I32;
  else if constexpr (std::is_same_v<U, std::int16_t>) return Dtype::I16;
  else if constexpr (std::is_same_v<U, std::int8_t>) return Dtype::I8;
  else if constexpr (std::is_same_v<U, std::uint64_t>) return Dtype::U64;
  else if constexpr (std::is_same_v<U, std::uint32_t>) return Dtype::U32;
  else if constexpr (std::is_same_v<U, std::uint16_t>) return Dtype::U16;
  else return Dtype::U8;
}

/// True if elements of `d` may be viewed as T (BOOL as std::uint8_t as well as U8).
template <typename T>
constexpr bool dtype_matches(Dtype d) noexcept {
  if constexpr (std::is_same_v<std::remove_cv_t<T>, std::uint8_t>) return d == Dtype::U8 || d == Dtype::BOOL;
  else return d == dtype_of<T>();
}

using Shape = std::vector<std::int64_t>;
using Metadata = std::map<std::string, std::string>;

/// Number of elements of a shape (1 for a scalar []).
inline std::int64_t numel(const Shape& shape) noexcept {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

/// "[a, b, c]".
inline std::string shape_string(const Shape& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

/// One tensor of a file: its name, dtype, shape and bytes (a view into the file's mapping; not owned).
struct TensorView {
  std::string name;
  Dtype dtype = Dtype::F32;
  Shape shape;
  span<const std::byte> bytes;

  std::int64_t numel() const noexcept { return safetensors::numel(shape); }

  /// Zero-copy typed view. Throws gqa::invalid_argument if the dtype is not T's ([gqa.safetensors.as]) or the
  /// data is not aligned for T ([gqa.safetensors.alignment]; files whose header length is not a multiple of 8,
  /// or odd layouts, can do that) — to_vector<T>() works for any alignment.
  template <typename T>
  span<const T> as() const {
    check_type<T>();
    gqa::detail::require(reinterpret_cast<std::uintptr_t>(bytes.data()) % alignof(T) == 0, "safetensors.alignment",
                         "tensor '", name, "': data is not aligned to ", alignof(T),
                         " bytes in the mapping; use to_vector<T>() to copy it");
    return {reinterpret_cast<const T*>(bytes.data()), static_cast<Index>(bytes.size() / sizeof(T))};
  }

  /// A typed copy of the data (any alignment). Throws like as<T>() on a dtype mismatch.
  template <typename T>
  std::vector<T> to_vector() const {
    check_type<T>();
    std::vector<T> out(static_cast<std::size_t>(bytes.size()) / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), bytes.data(), out.size() * sizeof(T));
    return out;
  }

 private:
  template <typename T>
  void check_type() const {
    gqa::detail::require(dtype_matches<T>(dtype), "safetensors.as", "tensor '", name, "' has dtype ",
                         dtype_name(dtype), ", not ", dtype_name(dtype_of<T>()));
  }
};

namespace detail {

using gqa::detail::concat;
using gqa::detail::require;

inline constexpr std::uint64_t max_header_size = 100'000'000;
inline constexpr int max_header_depth = 8;  // a valid header nests 3 deep; anything far deeper is hostile

inline std::uint64_t read_u64_le(const std::byte* p) noexcept {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint64_t>(p[i]);
  return v;
}

/// Builds a JSON value from nlohmann's SAX events, refusing duplicate keys and deep nesting. A SAX handler rather
/// than json::parse with a callback, because the callback parser scans the parent object for discarded values each
/// time an object ends, which makes a header of n tensors cost O(n^2) (35k tensors took 44 s). Here each key costs
/// one hash-set insertion and one append, so parsing is linear in the input.
template <typename Json>
class StrictJsonBuilder {
 public:
  using number_integer_t = typename Json::number_integer_t;
  using number_unsigned_t = typename Json::number_unsigned_t;
  using number_float_t = typename Json::number_float_t;
  using string_t = typename Json::string_t;
  using binary_t = typename Json::binary_t;

  StrictJsonBuilder(const std::string& where, const char* json_id, const char* dup_id, int max_depth)
      : where_(where), json_id_(json_id), dup_id_(dup_id), max_depth_(max_depth) {}

  Json& result() noexcept { return root_; }

  bool null() { return put(Json(nullptr)); }
  bool boolean(bool v) { return put(Json(v)); }
  bool number_integer(number_integer_t v) { return put(Json(v)); }
  bool number_unsigned(number_unsigned_t v) { return put(Json(v)); }
  bool number_float(number_float_t v, const string_t&) { return put(Json(v)); }
  bool string(string_t& v) { return put(Json(std::move(v))); }
  bool binary(binary_t& v) { return put(Json::binary(std::move(v))); }
  bool start_object(std::size_t) { return open(Json::object()); }
  bool start_array(std::size_t) { return open(Json::array()); }
  bool end_object() {
    keys_.pop_back();
    stack_.pop_back();
    return true;
  }
  bool end_array() {
    stack_.pop_back();
    return true;
  }
  bool key(string_t& k) {
    require<format_error>(keys_.back().insert(k).second, dup_id_, where_, ": key '", k, "' appears twice",
                          stack_.size() == 1 ? " at the top level" : "");
    key_ = std::move(k);
    return true;
  }
  template <typename Exception>
  bool parse_error(std::size_t, const std::string&, const Exception& e) {
    throw format_error(concat("[gqa.", json_id_, "] ", where_, ": not valid JSON: ", e.what()));
  }

 private:
  /// Adds `v` to the innermost open container (or makes it the root) and returns where it now lives. Appending to a
  /// container moves only that container's elements; the open containers are its ancestors, which do not move.
  Json* add(Json&& v) {
    if (stack_.empty()) {
      root_ = std::move(v);
      return &root_;
    }
    Json& parent = *stack_.back();
    if (parent.is_array()) {
      parent.push_back(std::move(v));
      return &parent.back();
    }
    auto& object = *parent.template get_ptr<typename Json::object_t*>();
    if constexpr (std::is_same_v<Json, nlohmann::ordered_json>) {
      // ordered_map::emplace searches linearly for the key; keys_ has already ruled out a duplicate, so append.
      object.emplace_back(std::move(key_), std::move(v));
      return &object.back().second;
    } else {
      return &object.emplace(std::move(key_), std::move(v)).first->second;
    }
  }
  bool put(Json&& v) {
    add(std::move(v));
    return true;
  }
  bool open(Json&& container) {
    require<format_error>(static_cast<int>(stack_.size()) < max_depth_, json_id_, where_, ": JSON nests deeper than ",
                          max_depth_, " levels");
    const bool object = container.is_object();
    stack_.push_back(add(std::move(container)));
    if (object) keys_.emplace_back();
    return true;
  }

  const std::string& where_;
  const char* json_id_;
  const char* dup_id_;
  int max_depth_;
  Json root_;
  std::vector<Json*> stack_;                           // the open containers, outermost first
  std::vector<std::unordered_set<std::string>> keys_;  // the keys seen so far, one set per open object
  string_t key_;                                       // the key of the next value in the innermost object
};

/// Parses JSON strictly, in time linear in its length: a duplicate key in any object throws format_error
/// [gqa.<dup_id>], nesting deeper than max_depth or invalid JSON throws format_error [gqa.<json_id>].
template <typename Json = nlohmann::json>
Json parse_json_strict(const char* begin, const char* end, const std::string& where, const char* json_id,
                       const char* dup_id, int max_depth = max_header_depth) {
  StrictJsonBuilder<Json> builder(where, json_id, dup_id, max_depth);
  Json::sax_parse(begin, end, &builder);
  return std::move(builder.result());
}

/// At most 64 characters of a JSON value, for error messages about hostile input.
inline std::string short_dump(const nlohmann::json& j) {
  std::string s = j.dump();
  if (s.size() > 64) s = s.substr(0, 61) + "...";
  return s;
}

/// A non-negative integer JSON value, or nullopt (negative, fractional, too large or not a number).
inline std::optional<std::uint64_t> non_negative_integer(const nlohmann::json& v) {
  if (v.is_number_unsigned()) return v.get<std::uint64_t>();
  if (v.is_number_integer() && v.get<std::int64_t>() >= 0) return static_cast<std::uint64_t>(v.get<std::int64_t>());
  return std::nullopt;
}

/// "<file>: tensor '<name>'" in messages, built only when a check fails (a header may hold 100k entries).
struct TensorWhere {
  const std::string& where;
  const std::string& name;
};
inline std::ostream& operator<<(std::ostream& os, const TensorWhere& t) {
  return os << t.where << ": tensor '" << t.name << "'";
}

/// One tensor entry of the header, validated against the buffer: its view and its byte range.
inline std::pair<TensorView, std::pair<std::uint64_t, std::uint64_t>> parse_entry(const std::string& name,
                                                                                 const nlohmann::json& entry,
                                                                                 const std::string& where,
                                                                                 const std::byte* buffer,
                                                                                 std::uint64_t buffer_size) {
  const TensorWhere tensor{where, name};
  require<format_error>(entry.is_object(), "safetensors.entry", tensor, ": entry is ", entry.type_name(),
                        ", not an object");
  for (const char* field : {"dtype", "shape", "data_offsets"})
    require<format_error>(entry.contains(field), "safetensors.entry", tensor, ": missing field \"", field, "\"");
  const auto& jd = entry["dtype"];
  require<format_error>(jd.is_string(), "safetensors.entry", tensor, ": \"dtype\" is ", jd.type_name(),
                        ", not a string");
  const auto dtype = parse_dtype(jd.get_ref<const std::string&>());
  require<format_error>(dtype.has_value(), "safetensors.dtype", tensor, ": unknown dtype \"",
                        jd.get_ref<const std::string&>(), "\"");

  const auto& js = entry["shape"];
  require<format_error>(js.is_array(), "safetensors.shape", tensor, ": \"shape\" is ", js.type_name(),
                        ", not an array");
  Shape shape;
  std::uint64_t bytes = dtype_size(*dtype);
  for (std::size_t i = 0; i < js.size(); ++i) {
    const auto d = non_negative_integer(js[i]);
    require<format_error>(d.has_value(), "safetensors.shape", tensor, ": shape[", i, "] = ", short_dump(js[i]),
                          " is not a non-negative integer");
    require<format_error>(*d <= static_cast<std::uint64_t>(INT64_MAX) && !__builtin_mul_overflow(bytes, *d, &bytes),
                          "safetensors.shape", tensor, ": byte size overflows at shape[", i, "] = ", *d);
    shape.push_back(static_cast<std::int64_t>(*d));
  }
  require<format_error>(bytes <= static_cast<std::uint64_t>(INT64_MAX), "safetensors.shape", tensor,
                        ": byte size of shape ", shape_string(shape), " overflows");

  const auto& jo = entry["data_offsets"];
  std::optional<std::uint64_t> begin, end;
  if (jo.is_array() && jo.size() == 2) {
    begin = non_negative_integer(jo[0]);
    end = non_negative_integer(jo[1]);
  }
  require<format_error>(begin && end, "safetensors.offsets", tensor, ": \"data_offsets\" = ", short_dump(jo),
                        " is not [begin, end] of non-negative integers");
  require<format_error>(*begin <= *end, "safetensors.offsets", tensor, ": data_offsets [", *begin, ", ", *end,
                        "] run backwards (begin > end)");
  require<format_error>(*end - *begin == bytes, "safetensors.size_mismatch", tensor, ": shape ",
                        shape_string(shape), " x ", dtype_size(*dtype), " bytes (", dtype_name(*dtype), ") = ",
                        bytes, " bytes but data_offsets [", *begin, ", ", *end, "] span ", *end - *begin);
  require<format_error>(*end <= buffer_size, "safetensors.out_of_bounds", tensor, ": data_offsets [", *begin, ", ",
                        *end, "] end beyond the ", buffer_size, "-byte buffer");
  return {TensorView{name, *dtype, std::move(shape),
                     span<const std::byte>(buffer + *begin, static_cast<Index>(*end - *begin))},
          {*begin, *end}};
}

/// Validates a whole file image (8-byte length, header, buffer) and returns its tensors sorted by data offset.
inline std::vector<TensorView> parse_file(const std::byte* data, std::size_t size, const std::string& where,
                                          Metadata& metadata, std::uint64_t& header_size) {
  require<format_error>(size >= 8, "safetensors.truncated", where, ": file is ", size,
                        " bytes, shorter than the 8-byte header length");
  const std::uint64_t n = read_u64_le(data);
  require<format_error>(n <= size - 8, "safetensors.header_length", where, ": header length ", n,
                        " exceeds the ", size - 8, " bytes after the length field");
  require<format_error>(n <= max_header_size, "safetensors.header_length", where, ": header length ", n,
                        " exceeds the limit of ", max_header_size, " bytes");
  header_size = n;
  const char* hb = reinterpret_cast<const char*>(data + 8);
  const nlohmann::json header = parse_json_strict(hb, hb + n, where, "safetensors.header_json", "safetensors.duplicate");
  require<format_error>(header.is_object(), "safetensors.header_object", where,
                        ": header is JSON but not an object (it is ", header.type_name(), ")");

  const std::byte* buffer = data + 8 + n;
  const std::uint64_t buffer_size = size - 8 - n;
  std::vector<TensorView> tensors;
  std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;  // parallel to tensors
  metadata.clear();
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      require<format_error>(entry.is_object(), "safetensors.metadata", where, ": __metadata__ is ", entry.type_name(),
                            ", not an object");
      for (const auto& [k, v] : entry.items()) {
        require<format_error>(v.is_string(), "safetensors.metadata", where, ": __metadata__ value of '", k, "' is ",
                              v.type_name(), ", not a string");
        metadata.emplace(k, v.get<std::string>());
      }
      continue;
    }
    auto [view, range] = parse_entry(name, entry, where, buffer, buffer_size);
    tensors.push_back(std::move(view));
    ranges.push_back(range);
  }

  // The ranges must tile [0, buffer_size) exactly.
  std::vector<std::size_t> order(tensors.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ranges[a] < ranges[b]; });
  std::uint64_t expected = 0;
  const TensorView* previous = nullptr;
  for (std::size_t i : order) {
    const auto [b, e] = ranges[i];
    require<format_error>(b >= expected, "safetensors.overlap", where, ": tensors '",
                          previous ? previous->name : std::string(), "' and '", tensors[i].name,
                          "' overlap (one ends at ", expected, ", the other begins at ", b, ")");
    require<format_error>(b == expected, "safetensors.gap", where, ": bytes [", expected, ", ", b,
                          ") of the buffer belong to no tensor (before '", tensors[i].name, "')");
    expected = e;
    previous = &tensors[i];
  }
  require<format_error>(expected == buffer_size, "safetensors.trailing_bytes", where, ": the tensors cover ", expected,
                        " bytes but the buffer has ", buffer_size);

  std::vector<TensorView> sorted;
  sorted.reserve(tensors.size());
  for (std::size_t i : order) sorted.push_back(std::move(tensors[i]));
  return sorted;
}

}  // namespace detail

/// A validated safetensors file: memory-mapped (open) or an in-memory image (from_bytes). Movable, not copyable.
class File {
 public:
  /// Maps `path` read-only and validates it (see the header comment). Throws gqa::io_error if the OS refuses,
  /// gqa::format_error if the file is malformed.
  static File open(const std::filesystem::path& path) {
    File f;
    f.path_ = path;
    f.mapping_ = gqa::detail::MappedFile(path);
    f.init(f.mapping_.data(), f.mapping_.size());
    return f;
  }

  /// Validates an in-memory file image (kept inside the File). `name` is used in error messages.
  static File from_bytes(std::vector<std::byte> image, std::string name = "<memory>") {
    File f;
    f.path_ = std::move(name);
    f.image_ = std::move(image);
    f.init(f.image_.data(), f.image_.size());
    return f;
  }

  File() = default;
  File(File&&) noexcept = default;
  File& operator=(File&&) noexcept = default;

  /// All tensors, ordered by data offset.
  const std::vector<TensorView>& tensors() const noexcept { return tensors_; }
  std::size_t size() const noexcept { return tensors_.size(); }
  /// The tensor called `name`, or nullptr.
  const TensorView* find(std::string_view name) const {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
  }
  bool contains(std::string_view name) const { return find(name) != nullptr; }
  /// The tensor called `name`; throws gqa::invalid_argument [gqa.safetensors.not_found] if there is none.
  const TensorView& at(std::string_view name) const {
    const TensorView* t = find(name);
    gqa::detail::require(t != nullptr, "safetensors.not_found", path_.string(), ": no tensor named '", name, "'");
    return *t;
  }
  const Metadata& metadata() const noexcept { return metadata_; }
  /// N, the JSON header's length in bytes.
  std::uint64_t header_size() const noexcept { return header_size_; }
  std::uint64_t file_size() const noexcept { return file_size_; }
  /// Sum of the tensors' byte sizes (the buffer size).
  std::uint64_t data_size() const noexcept { return file_size_ - (file_size_ ? 8 + header_size_ : 0); }
  const std::filesystem::path& path() const noexcept { return path_; }

 private:
  void init(const std::byte* data, std::size_t size) {
    file_size_ = size;
    tensors_ = detail::parse_file(data, size, path_.string(), metadata_, header_size_);
    for (std::size_t i = 0; i < tensors_.size(); ++i) by_name_.emplace(tensors_[i].name, i);
  }

  std::filesystem::path path_;
  gqa::detail::MappedFile mapping_;
  std::vector<std::byte> image_;
  std::vector<TensorView> tensors_;
  std::map<std::string, std::size_t, std::less<>> by_name_;
  Metadata metadata_;
  std::uint64_t header_size_ = 0;
  std::uint64_t file_size_ = 0;
};

/// Builds a safetensors file from tensors given as byte spans (not copied) or as producers (called once, when the
/// tensor is written, to fill a zeroed buffer of exactly its size — so a converter holds one tensor at a time).
class Writer {
 public:
  using Producer = std::function<void(span<std::byte>)>;

  explicit Writer(Metadata metadata = {{"format", "pt"}}) : metadata_(std::move(metadata)) {}

  /// Adds a tensor whose bytes are `data`; the bytes must stay valid until write() returns.
  void add(std::string name, Dtype dtype, Shape shape, span<const std::byte> data) {
    const std::uint64_t n = check(name, dtype, shape);
    gqa::detail::require(static_cast<std::uint64_t>(data.size()) == n, "safetensors.size_mismatch", "Writer::add '",
                         name, "': shape ", shape_string(shape), " of ", dtype_name(dtype), " needs ", n,
                         " bytes but data has ", data.size());
    entries_.push_back({std::move(name), dtype, std::move(shape), n, data, nullptr});
  }
  /// Adds a typed tensor (dtype_of<T>()); the data must stay valid until write() returns.
  template <typename T>
  void add(std::string name, Shape shape, span<const T> data) {
    add(std::move(name), dtype_of<T>(), std::move(shape),
        span<const std::byte>(reinterpret_cast<const std::byte*>(data.data()),
                              static_cast<Index>(data.size() * sizeof(T))));
  }
  /// Adds a tensor whose bytes `produce` writes into the buffer it is given, during write().
  void add(std::string name, Dtype dtype, Shape shape, Producer produce) {
    const std::uint64_t n = check(name, dtype, shape);
    gqa::detail::require(static_cast<bool>(produce), "safetensors.producer", "Writer::add '", name,
                         "': empty producer");
    entries_.push_back({std::move(name), dtype, std::move(shape), n, {}, std::move(produce)});
  }

  std::size_t size() const noexcept { return entries_.size(); }
  /// Sum of the tensors' byte sizes (the index's total_size).
  std::uint64_t data_size() const noexcept {
    std::uint64_t s = 0;
    for (const auto& e : entries_) s += e.bytes;
    return s;
  }

  /// Lays the file out (see the header comment) and writes it to `path` atomically. Returns the file size.
  /// Throws gqa::io_error if the OS refuses; whatever a producer throws propagates. Either way nothing is left
  /// at `path` (an existing file there is untouched) and no temporary file remains.
  /// With `cancel`, checked before each tensor: once it is nonzero, write() stops and throws gqa::io_error
  /// [gqa.checkpoint.interrupted] (a signal handler sets it), leaving nothing behind as for any other failure.
  std::uint64_t write(const std::filesystem::path& path, const std::atomic<int>* cancel = nullptr) const {
    std::vector<std::size_t> order(entries_.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
      return dtype_size(entries_[a].dtype) > dtype_size(entries_[b].dtype);
    });
    // The header text is built directly (compact JSON, the layout json::dump() gives): a JSON object per entry
    // would cost an allocation per field, noticeable at 100k tensors. add() has already refused duplicate names.
    std::string text = "{";
    if (!metadata_.empty()) {
      nlohmann::ordered_json m = nlohmann::ordered_json::object();
      for (const auto& [k, v] : metadata_) m[k] = v;
      text += "\"__metadata__\":" + m.dump();
    }
    std::uint64_t offset = 0;
    for (std::size_t i : order) {
      const Entry& e = entries_[i];
      if (text.size() > 1) text += ',';
      text += nlohmann::json(e.name).dump();
      text += ":{\"dtype\":\"";
      text += dtype_name(e.dtype);
      text += "\",\"shape\":[";
      for (std::size_t d = 0; d < e.shape.size(); ++d) text += (d ? "," : "") + std::to_string(e.shape[d]);
      text += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(offset + e.bytes) + "]}";
      offset += e.bytes;
    }
    text += '}';
    text.append((8 - (text.size() % 8)) % 8, ' ');
    std::array<unsigned char, 8> length{};
    for (int i = 0; i < 8; ++i) length[i] = static_cast<unsigned char>((static_cast<std::uint64_t>(text.size()) >> (8 * i)) & 0xff);

    gqa::detail::AtomicFile file(path);
    file.write(length.data(), length.size());
    file.write(text);
    std::vector<std::byte> scratch;
    for (std::size_t i : order) {
      const Entry& e = entries_[i];
      gqa::detail::require<io_error>(cancel == nullptr || cancel->load() == 0, "checkpoint.interrupted",
                                     "interrupted (signal ", cancel ? cancel->load() : 0, ") while writing '",
                                     path.string(), "'");
      if (e.produce) {
        scratch.assign(static_cast<std::size_t>(e.bytes), std::byte{0});
        e.produce(span<std::byte>(scratch.data(), static_cast<Index>(scratch.size())));
        file.write(scratch.data(), scratch.size());
        std::vector<std::byte>().swap(scratch);
      } else if (e.bytes > 0) {
        file.write(e.data.data(), static_cast<std::size_t>(e.bytes));
      }
    }
    file.commit();
    return 8 + text.size() + offset;
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    Shape shape;
    std::uint64_t bytes;
    span<const std::byte> data;
    Producer produce;
  };

  std::uint64_t check(const std::string& name, Dtype dtype, const Shape& shape) {
    gqa::detail::require(name != "__metadata__", "safetensors.name", "Writer::add: '__metadata__' is reserved");
    gqa::detail::require(names_.count(name) == 0, "safetensors.duplicate", "Writer::add: tensor '", name,
                         "' added twice");
    try {  // the header is JSON, which needs UTF-8: refuse here rather than let json::dump throw in write()
      (void)nlohmann::json(name).dump();
    } catch (const nlohmann::json::exception&) {
      gqa::detail::require(false, "safetensors.name", "Writer::add: tensor name is not valid UTF-8");
    }
    std::uint64_t n = dtype_size(dtype);
    for (std::size_t i = 0; i < shape.size(); ++i) {
      gqa::detail::require<shape_error>(shape[i] >= 0, "safetensors.shape", "Writer::add '", name, "': shape[", i,
                                        "] = ", shape[i], " is negative");
      gqa::detail::require<shape_error>(!__builtin_mul_overflow(n, static_cast<std::uint64_t>(shape[i]), &n),
                                        "safetensors.shape", "Writer::add '", name, "': byte size overflows");
    }
    names_.insert(name);
    return n;
  }

  Metadata metadata_;
  std::vector<Entry> entries_;
  std::set<std::string> names_;
};

/// Writes `tensors` (e.g. File::tensors() of another file) to `path` atomically; see Writer.
inline std::uint64_t save(const std::filesystem::path& path, const std::vector<TensorView>& tensors,
                          Metadata metadata = {{"format", "pt"}}) {
  Writer w(std::move(metadata));
  for (const auto& t : tensors) w.add(t.name, t.dtype, t.shape, t.bytes);
  return w.write(path);
}

inline constexpr const char* index_file_name = "model.safetensors.index.json";
inline constexpr const char* single_file_name = "model.safetensors";

/// model.safetensors.index.json: which shard holds each tensor.
struct ShardIndex {
  /// The "metadata" object as read (other fields are kept); write_index() sets "total_size" from total_size.
  nlohmann::json metadata = nlohmann::json::object();
  std::uint64_t total_size = 0;
  /// tensor name -> shard file name (a plain file name in the checkpoint directory)
  std::map<std::string, std::string> weight_map;

  /// The shard file names, sorted, each once.
  std::vector<std::string> shards() const {
    std::vector<std::string> s;
    for (const auto& kv : weight_map) s.push_back(kv.second);
    std::sort(s.begin(), s.end());
    s.erase(std::unique(s.begin(), s.end()), s.end());
    return s;
  }
};

/// Reads and validates an index file ([gqa.safetensors.index] on anything malformed).
inline ShardIndex read_index(const std::filesystem::path& path) {
  using gqa::detail::require;
  gqa::detail::MappedFile m(path);
  const char* p = reinterpret_cast<const char*>(m.data());
  const nlohmann::json j = detail::parse_json_strict(p, p + m.size(), path.string(), "safetensors.index",
                                                      "safetensors.index");
  require<format_error>(j.is_object(), "safetensors.index", path.string(), ": not a JSON object");
  ShardIndex idx;
  if (j.contains("metadata")) {
    require<format_error>(j["metadata"].is_object(), "safetensors.index", path.string(),
                          ": \"metadata\" is not an object");
    idx.metadata = j["metadata"];
    if (idx.metadata.contains("total_size")) {
      const auto& t = idx.metadata["total_size"];
      require<format_error>(t.is_number_unsigned() || (t.is_number_integer() && t.get<std::int64_t>() >= 0),
                            "safetensors.index", path.string(), ": metadata.total_size = ", t.dump(),
                            " is not a non-negative integer");
      idx.total_size = t.get<std::uint64_t>();
    }
  }
  require<format_error>(j.contains("weight_map") && j["weight_map"].is_object(), "safetensors.index", path.string(),
                        ": missing \"weight_map\" object");
  for (const auto& [name, file] : j["weight_map"].items()) {
    require<format_error>(file.is_string(), "safetensors.index", path.string(), ": weight_map['", name,
                          "'] is not a string");
    const auto& f = file.get_ref<const std::string&>();
    require<format_error>(!f.empty() && f != "." && f != ".." && f.find('/') == std::string::npos &&
                              f.find('\\') == std::string::npos && f.find('\0') == std::string::npos,
                          "safetensors.index", path.string(), ": weight_map['", name, "'] = '", f,
                          "' is not a plain file name in the checkpoint directory");
    idx.weight_map.emplace(name, f);
  }
  return idx;
}

/// Writes an index file atomically (indent 2, metadata first, weight_map sorted by tensor name).
inline void write_index(const std::filesystem::path& path, const ShardIndex& index) {
  nlohmann::ordered_json j;
  j["metadata"] = nlohmann::ordered_json::object();
  if (index.metadata.is_object())
    for (const auto& [k, v] : index.metadata.items()) j["metadata"][k] = nlohmann::ordered_json::parse(v.dump());
  j["metadata"]["total_size"] = index.total_size;
  auto& wm = *(j["weight_map"] = nlohmann::ordered_json::object()).get_ptr<nlohmann::ordered_json::object_t*>();
  for (const auto& [name, file] : index.weight_map) wm.emplace_back(name, file);  // unique: a std::map's keys
  gqa::detail::write_file_atomically(path, j.dump(2) + "\n");
}

/// The safetensors files of a checkpoint directory: model.safetensors.index.json and its shards, or a single
/// model.safetensors. Tensors are looked up by name across all files.
class Directory {
 public:
  static Directory open(const std::filesystem::path& dir) {
    Directory c;
    c.dir_ = dir;
    const auto index_path = dir / index_file_name;
    std::error_code ec;
    const bool has_index = std::filesystem::exists(std::filesystem::symlink_status(index_path, ec));
    if (has_index) {
      c.index_ = read_index(index_path);
      for (const auto& shard : c.index_->shards()) {
        c.file_names_.push_back(shard);
        c.files_.push_back(File::open(dir / shard));
      }
      for (std::size_t f = 0; f < c.files_.size(); ++f) {
        for (const auto& t : c.files_[f].tensors()) {
          const auto it = c.index_->weight_map.find(t.name);
          gqa::detail::require<format_error>(it != c.index_->weight_map.end(), "safetensors.index", "shard '",
                                             c.file_names_[f], "' holds tensor '", t.name, "' that ",
                                             index_file_name, " does not name");
          gqa::detail::require<format_error>(it->second == c.file_names_[f], "safetensors.index", "tensor '",
                                             t.name, "' is in shard '", c.file_names_[f], "' but ", index_file_name,
                                             " says '", it->second, "'");
          c.where_.emplace(t.name, f);
        }
      }
      for (const auto& [name, file] : c.index_->weight_map)
        gqa::detail::require<format_error>(c.where_.count(name) == 1, "safetensors.index", index_file_name,
                                           " names tensor '", name, "' in '", file, "' but that shard lacks it");
    } else {
      const auto single = dir / single_file_name;
      gqa::detail::require<io_error>(std::filesystem::exists(std::filesystem::symlink_status(single, ec)), "io", "'",
                                     dir.string(), "' has neither ",
                                     index_file_name, " nor ", single_file_name);
      c.file_names_.push_back(single_file_name);
      c.files_.push_back(File::open(single));
      for (const auto& t : c.files_[0].tensors()) c.where_.emplace(t.name, 0);
    }
    return c;
  }

  bool sharded() const noexcept { return index_.has_value(); }
  /// The index (sharded checkpoints only).
  const std::optional<ShardIndex>& index() const noexcept { return index_; }
  const std::vector<File>& files() const noexcept { return files_; }
  /// File names (relative to the directory), parallel to files().
  const std::vector<std::string>& file_names() const noexcept { return file_names_; }
  const std::filesystem::path& directory() const noexcept { return dir_; }
  /// Number of tensors over all files.
  std::size_t size() const noexcept { return where_.size(); }

  const TensorView* find(std::string_view name) const {
    const auto it = where_.find(name);
    return it == where_.end() ? nullptr : files_[it->second].find(name);
  }
  const TensorView& at(std::string_view name) const {
    const TensorView* t = find(name);
    gqa::detail::require(t != nullptr, "safetensors.not_found", dir_.string(), ": no tensor named '", name, "'");
    return *t;
  }
  /// Index into files() of the file holding `name`; throws like at().
  std::size_t file_of(std::string_view name) const {
    const auto it = where_.find(name);
    gqa::detail::require(it != where_.end(), "safetensors.not_found", dir_.string(), ": no tensor named '", name,
                         "'");
    return it->second;
  }

 private:
  std::filesystem::path dir_;
  std::optional<ShardIndex> index_;
  std::vector<File> files_;
  std::vector<std::string> file_names_;
  std::map<std::string, std::size_t, std::less<>> where_;
};

}  // namespace gqa::safetensors
