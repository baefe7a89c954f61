# Distributed tests (gqa/distributed.hpp, gqa::mpi): test_distributed, built whenever CMake finds MPI, with its
# own main (tests/support/mpi_main.cpp: the program calls MPI_Init, gqa never does), run by ctest under mpirun on
# P = 1, 2, 3 and 4 ranks of this machine, labelled mpi (ctest -L mpi). Included from tests/CMakeLists.txt.
#
# What Open MPI needs to run here is set on the tests, not in the user's environment: --oversubscribe (more ranks
# than cores), OMPI_ALLOW_RUN_AS_ROOT* (CI runs as root; mpirun refuses root otherwise), OMPI_MCA_plm=isolated
# (ranks on this machine only: no ssh or rsh needed, which a container may lack), one OpenMP thread per rank (the
# ranks share the cores), and no single-copy (CMA) transfers between ranks, which containers that forbid ptrace
# refuse. Under AddressSanitizer, LeakSanitizer reports Open MPI's own allocations that it never frees:
# tests/support/lsan_openmpi.supp suppresses those by library (libmpi, libopen-pal, ...), so gqa's code and the
# test's stay checked (a leak in the test's own code is still reported: checked with a deliberate one); the full
# unwinder (fast_unwind_on_malloc=0) lets those stacks reach past Open MPI's plugins, which lack frame pointers.
# LSAN_OPTIONS only: the sanitizer stage's ASAN_OPTIONS (detect_leaks=1) stays as .ci/run sets it.
if(NOT TARGET gqa_mpi)
  return()
endif()

add_executable(test_distributed ${CMAKE_CURRENT_SOURCE_DIR}/test_distributed.cpp
                                ${CMAKE_CURRENT_SOURCE_DIR}/support/mpi_main.cpp)
target_include_directories(test_distributed PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
target_link_libraries(test_distributed PRIVATE gqa::mpi Catch2::Catch2 gqa_dev_flags gqa_test_code_flags)
gqa_use_prebuilt(test_distributed)

if(NOT MPIEXEC_EXECUTABLE)
  message(WARNING "gqa: MPI found but no mpirun/mpiexec (MPIEXEC_EXECUTABLE): test_distributed is built, not run")
  return()
endif()
set(gqa_mpi_test_environment OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_plm=isolated
    OMPI_MCA_btl_vader_single_copy_mechanism=none OMP_NUM_THREADS=1
    LSAN_OPTIONS=fast_unwind_on_malloc=0:suppressions=${CMAKE_CURRENT_SOURCE_DIR}/support/lsan_openmpi.supp)
foreach(ranks 1 2 3 4)
  add_test(NAME test_distributed:np${ranks}
           COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} --oversubscribe ${MPIEXEC_PREFLAGS}
                   $<TARGET_FILE:test_distributed> ${MPIEXEC_POSTFLAGS})
  set_tests_properties(test_distributed:np${ranks} PROPERTIES LABELS mpi TIMEOUT 300 PROCESSORS ${ranks}
                       ENVIRONMENT "${gqa_mpi_test_environment}")
endforeach()

# test_decoder runs `mpirun ... example_decoder ... --tensor-parallel` end to end, with the same environment.
if(GQA_BUILD_EXAMPLES AND TARGET test_decoder)
  list(JOIN gqa_mpi_test_environment " " gqa_mpi_env_words)
  target_compile_definitions(test_decoder PRIVATE
                             GQA_MPI_RUN="env ${gqa_mpi_env_words} '${MPIEXEC_EXECUTABLE}' ${MPIEXEC_PREFLAGS}")
endif()

# test_tensor_parallel: the example decoder split by heads across the ranks (examples/model/tensor_parallel.hpp,
# example_decoder --tensor-parallel). It compiles example code, so it is built with the examples only (like
# test_decoder; .ci/run's sanitizer stage builds none), on the same P and with the same environment as above.
if(GQA_BUILD_EXAMPLES AND EXISTS "${PROJECT_SOURCE_DIR}/examples/model/tensor_parallel.hpp")
  add_executable(test_tensor_parallel ${CMAKE_CURRENT_SOURCE_DIR}/test_tensor_parallel.cpp
                                      ${CMAKE_CURRENT_SOURCE_DIR}/support/mpi_main.cpp)
  target_include_directories(test_tensor_parallel PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  target_link_libraries(test_tensor_parallel PRIVATE gqa::mpi gqa::checkpoint Catch2::Catch2 gqa_dev_flags
                        gqa_test_code_flags)
  gqa_use_prebuilt(test_tensor_parallel)
  foreach(ranks 1 2 3 4)
    add_test(NAME test_tensor_parallel:np${ranks}
             COMMAND ${MPIEXEC_EXECUTABLE} ${MPIEXEC_NUMPROC_FLAG} ${ranks} --oversubscribe ${MPIEXEC_PREFLAGS}
                     $<TARGET_FILE:test_tensor_parallel> ${MPIEXEC_POSTFLAGS})
    set_tests_properties(test_tensor_parallel:np${ranks} PROPERTIES LABELS mpi TIMEOUT 300 PROCESSORS ${ranks}
                         ENVIRONMENT "${gqa_mpi_test_environment}")
  endforeach()
endif()
