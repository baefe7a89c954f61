// The forward kernels that tests/support/kernels.hpp declares (see there); kernels_backward.cpp has the backward
// ones. Two TUs so that a parallel build compiles them side by side: together they are the longest compile of the
// tests.
#define GQA_TEST_KERNELS_DEFINE
#include "support/kernels.hpp"

#define GQA_TEST_DEFINE_FORWARD(T, KVT) GQA_TEST_FORWARD(, T, KVT)
GQA_TEST_KERNEL_TYPES(GQA_TEST_DEFINE_FORWARD)
GQA_TEST_INT8_KERNEL_TYPES(GQA_TEST_DEFINE_FORWARD)
