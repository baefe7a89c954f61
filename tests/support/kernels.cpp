// The explicit instantiations that tests/support/kernels.hpp declares (see there).
#define GQA_TEST_KERNELS_DEFINE
#include "support/kernels.hpp"

#define GQA_TEST_DEFINE_KERNELS(T, KVT) GQA_TEST_KERNELS(, T, KVT)
#define GQA_TEST_DEFINE_FORWARD(T, KVT) GQA_TEST_FORWARD(, T, KVT)
GQA_TEST_KERNEL_TYPES(GQA_TEST_DEFINE_KERNELS)
GQA_TEST_INT8_KERNEL_TYPES(GQA_TEST_DEFINE_FORWARD)
