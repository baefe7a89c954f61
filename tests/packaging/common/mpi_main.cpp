// A consumer of gqa::mpi: gqa/distributed.hpp compiles and links against the package's MPI. Built by the packaging
// tests, not run (that would need mpirun).
#include <gqa/distributed.hpp>

#include <cstdio>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  const gqa::HeadShard shard = gqa::head_shard(8, 2, MPI_COMM_WORLD);
  std::printf("rank %d: query heads %ld.., KV heads %ld..\n", shard.rank, long(shard.first_head),
              long(shard.first_kv_head));
  MPI_Finalize();
  return 0;
}
