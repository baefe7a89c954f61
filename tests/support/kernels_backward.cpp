// The backward kernels that tests/support/kernels.hpp declares (see there and kernels.cpp).
#define GQA_TEST_KERNELS_DEFINE
#include "support/kernels.hpp"

#define GQA_TEST_DEFINE_BACKWARD(T, KVT) GQA_TEST_BACKWARD(, T, KVT)
GQA_TEST_KERNEL_TYPES(GQA_TEST_DEFINE_BACKWARD)
