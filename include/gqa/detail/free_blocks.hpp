// gqa/detail/free_blocks.hpp — the free blocks of a PagedKVCache pool as runs of consecutive ids, so that the
// allocator can hand a growing sequence the block right after its last one, or a new one the start of a long run.
//
// Blocks are ids [0, num_blocks). FreeBlocks keeps the free ones as maximal runs [start, start + length), by start
// and by length; taking any free block and giving one back are O(log runs), and so is finding the longest run.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/detail/assert.hpp"

#include <cstdint>
#include <iterator>
#include <map>
#include <set>
#include <utility>

namespace gqa {
namespace detail {

class FreeBlocks {
 public:
  /// Every block of [0, num_blocks) free.
  explicit FreeBlocks(std::int32_t num_blocks) {
    if (num_blocks > 0) insert_run(0, num_blocks);
    count_ = num_blocks;
  }

  std::int32_t size() const noexcept { return count_; }
  bool empty() const noexcept { return count_ == 0; }
  bool contains(std::int32_t block) const { return run_holding(block) != by_start_.end(); }

  /// The longest run (the lowest-numbered of equal ones) as {start, length}. Not empty.
  std::pair<std::int32_t, std::int32_t> longest() const {
    GQA_ASSERT(!empty());
    const auto& [minus_length, start] = *by_length_.begin();
    return {start, -minus_length};
  }

  /// Takes `block`, which is free.
  void take(std::int32_t block) {
    const auto it = run_holding(block);
    GQA_ASSERT(it != by_start_.end());
    const std::int32_t start = it->first, end = it->first + it->second;
    erase_run(it);
    if (block > start) insert_run(start, block - start);
    if (block + 1 < end) insert_run(block + 1, end - block - 1);
    --count_;
  }

  /// Gives back `block`, which is taken: merged with the runs it touches.
  void give_back(std::int32_t block) {
    GQA_ASSERT(!contains(block));
    std::int32_t start = block, end = block + 1;
    auto next = by_start_.lower_bound(block + 1);
    if (next != by_start_.end() && next->first == end) {
      end += next->second;
      next = erase_run(next);
    }
    if (next != by_start_.begin()) {
      const auto prev = std::prev(next);
      if (prev->first + prev->second == start) {
        start = prev->first;
        erase_run(prev);
      }
    }
    insert_run(start, end - start);
    ++count_;
  }

 private:
  using Runs = std::map<std::int32_t, std::int32_t>;  // start -> length

  Runs::const_iterator run_holding(std::int32_t block) const {
    auto it = by_start_.upper_bound(block);
    if (it == by_start_.begin()) return by_start_.end();
    --it;
    return block < it->first + it->second ? it : by_start_.end();
  }
  void insert_run(std::int32_t start, std::int32_t length) {
    by_start_.emplace(start, length);
    by_length_.emplace(-length, start);
  }
  Runs::iterator erase_run(Runs::const_iterator it) {
    by_length_.erase({-it->second, it->first});
    return by_start_.erase(it);
  }

  Runs by_start_;
  std::set<std::pair<std::int32_t, std::int32_t>> by_length_;  // (-length, start): the longest, lowest first
  std::int32_t count_ = 0;
};

}  // namespace detail
}  // namespace gqa
