// gqa/detail/masks.hpp — which keys a query sees under the structural masks, and the contract they keep.
//
// The masks of gqa/options.hpp that act on positions (key lengths, causal, sliding window) give query i of a
// sequence with `len` valid keys one range of visible keys, visible_keys(p, i, len) = [lo, hi). The kernels rely
// on two properties of it, the mask contract:
//   1. one contiguous range per query;
//   2. both ends non-decreasing in the query index: lo(i) <= lo(i + 1) and hi(i) <= hi(i + 1).
// From them, queries [q0, q0 + nq) together see keys [lo(q0), hi(q0 + nq - 1)) and each of them sees
// [lo(q0 + nq - 1), hi(q0)) (when not empty): tile_keys_any and tile_keys_all. The forward kernel visits only the
// first range and masks element by element only outside the second. A mask without these properties would be
// silently wrong there, so a new mask goes into visible_keys only if it keeps them (debug builds assert them in
// the forward kernel's tile loop, through follows_mask_contract); anything else is an additive bias of -inf.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/assert.hpp"
#include "gqa/types.hpp"

#include <algorithm>

namespace gqa {
namespace detail {

/// Keys [lo, hi) (empty when hi <= lo).
struct KeyRange {
  Index lo = 0, hi = 0;

  Index size() const noexcept { return std::max<Index>(0, hi - lo); }
  bool empty() const noexcept { return hi <= lo; }
};

/// Visible keys of query i (0-based within Sq) of a sequence with `len` valid keys, under p's key lengths, causal
/// and window settings (the rules of gqa/options.hpp). P: any params type with q_len, causal and window.
template <typename P>
KeyRange visible_keys(const P& p, Index i, Index len) {
  const Index pos = i + len - p.q_len;  // absolute position, bottom-right aligned
  KeyRange r;
  r.hi = p.causal ? std::clamp<Index>(pos + 1, 0, len) : len;
  r.lo = p.window > 0 ? std::clamp<Index>(pos - p.window + 1, 0, len) : 0;
  r.lo = std::min(r.lo, r.hi);
  return r;
}

/// Whether `next`, the range of the query after the one that sees `prev`, keeps the mask contract.
inline bool follows_mask_contract(const KeyRange& prev, const KeyRange& next) {
  return next.lo <= next.hi && prev.lo <= next.lo && prev.hi <= next.hi;
}

/// Keys that some query of [q0, q0 + nq) sees (nq >= 1); by the contract, from the first query's lo to the last's hi.
template <typename P>
KeyRange tile_keys_any(const P& p, Index q0, Index nq, Index len) {
  const KeyRange first = visible_keys(p, q0, len), last = visible_keys(p, q0 + nq - 1, len);
  return {first.lo, std::max(last.hi, first.lo)};
}

/// Keys that every query of [q0, q0 + nq) sees (nq >= 1); may be empty.
template <typename P>
KeyRange tile_keys_all(const P& p, Index q0, Index nq, Index len) {
  return {visible_keys(p, q0 + nq - 1, len).lo, visible_keys(p, q0, len).hi};
}

}  // namespace detail
}  // namespace gqa
