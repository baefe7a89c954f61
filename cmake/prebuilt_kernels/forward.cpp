// The forward kernels that kernels.hpp declares (see there); backward.cpp has the backward ones. Two TUs so that a
// parallel build compiles them side by side: together they are the longest compile of the tests.
#define GQA_PREBUILT_KERNELS_DEFINE
#include "kernels.hpp"

#define GQA_PREBUILT_DEFINE_FORWARD(T, KVT) GQA_PREBUILT_FORWARD(, T, KVT)
GQA_PREBUILT_KERNEL_TYPES(GQA_PREBUILT_DEFINE_FORWARD)
GQA_PREBUILT_INT8_KERNEL_TYPES(GQA_PREBUILT_DEFINE_FORWARD)
