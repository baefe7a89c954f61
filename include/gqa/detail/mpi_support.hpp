// gqa/detail/mpi_support.hpp — the MPI plumbing of gqa/distributed.hpp: checked calls, and argument checks that
// every rank of a communicator passes or fails together (a rank that threw alone would leave the others waiting
// in a collective forever).
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include "gqa/errors.hpp"
#include "gqa/types.hpp"

#include <mpi.h>

#include <exception>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace gqa {
namespace detail {

/// Throws io_error "[gqa.distributed.mpi] ..." when an MPI call did not succeed (only seen with an error handler
/// that returns, MPI_ERRORS_RETURN; MPI's default handler aborts the job instead).
inline void check_mpi(int rc, const char* call) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  MPI_Error_string(rc, text, &length);
  throw io_error(concat("[gqa.distributed.mpi] ", call, " failed: ", std::string(text, std::size_t(length))));
}

inline int comm_size(MPI_Comm comm) {
  int size = 0;
  check_mpi(MPI_Comm_size(comm, &size), "MPI_Comm_size");
  return size;
}

inline int comm_rank(MPI_Comm comm) {
  int rank = 0;
  check_mpi(MPI_Comm_rank(comm, &rank), "MPI_Comm_rank");
  return rank;
}

/// Sum of `value` over the ranks of comm.
inline long long sum_over_ranks(MPI_Comm comm, long long value) {
  long long sum = 0;
  check_mpi(MPI_Allreduce(&value, &sum, 1, MPI_LONG_LONG, MPI_SUM, comm), "MPI_Allreduce");
  return sum;
}

/// A value that must be the same on every rank, and its name for the message.
struct MustAgree {
  const char* name;
  long long value;
};

/// Runs this rank's argument checks, then (one MPI_Allreduce) makes every rank throw if any rank's checks threw
/// or a `must_agree` value differs between ranks: this rank's own exception if it has one, else
/// invalid_argument "[gqa.distributed.peer]" (another rank refused its arguments) or shape_error
/// "[gqa.distributed.shape]" (the values disagree). `call` names the API function for the messages.
template <typename Checks>
void check_on_every_rank(MPI_Comm comm, const char* call, std::initializer_list<MustAgree> must_agree,
                         Checks&& checks) {
  std::exception_ptr error;
  try {
    checks();
  } catch (...) {
    error = std::current_exception();
  }
  std::vector<long long> mine{error ? 1LL : 0LL};
  for (const MustAgree& a : must_agree) {  // max of v and of -v: the largest and the smallest in one reduction
    mine.push_back(a.value);
    mine.push_back(-a.value);
  }
  std::vector<long long> all(mine.size());
  check_mpi(MPI_Allreduce(mine.data(), all.data(), int(mine.size()), MPI_LONG_LONG, MPI_MAX, comm),
            "MPI_Allreduce");
  if (error) std::rethrow_exception(error);
  require(all[0] == 0, "distributed.peer", call, ": another rank of the communicator refused its arguments (its "
          "exception names them); this rank's were fine");
  std::size_t i = 1;
  for (const MustAgree& a : must_agree) {
    require<shape_error>(all[i] == -all[i + 1], "distributed.shape", call, ": ", a.name, " differs between ranks (",
                         -all[i + 1], " to ", all[i], "; this rank's: ", a.value, ")");
    i += 2;
  }
}

/// Bytes as an MPI count (int), refused beyond INT_MAX rather than truncated.
inline int byte_count(std::size_t bytes, const char* what) {
  require<shape_error>(bytes <= std::size_t(2147483647), "distributed.shape", what, ": ", bytes,
          " bytes in one message exceed MPI's int count (2^31 - 1); split the batch or the sequence");
  return int(bytes);
}

}  // namespace detail
}  // namespace gqa
