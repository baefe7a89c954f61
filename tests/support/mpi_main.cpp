// The main of the distributed tests (tests/test_distributed.cpp): the program, not gqa, owns MPI_Init and
// MPI_Finalize. Every rank runs the same test cases in the same order (their collectives pair up); the exit status
// is non-zero if any rank failed a check, so mpirun's status is the whole run's.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const int failed = Catch::Session().run(argc, argv);
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed != 0 ? 1 : 0;
}
