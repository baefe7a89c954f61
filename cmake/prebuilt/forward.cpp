// The forward kernels that prebuilt.hpp declares (see there); backward.cpp and convert.cpp have the rest. Separate
// TUs so that a parallel build compiles them side by side.
#define GQA_PREBUILT_DEFINE
#include "prebuilt.hpp"

#define GQA_PREBUILT_DEFINE_FORWARD(T, KVT) GQA_PREBUILT_FORWARD(, T, KVT)
GQA_PREBUILT_KERNEL_TYPES(GQA_PREBUILT_DEFINE_FORWARD)
GQA_PREBUILT_INT8_KERNEL_TYPES(GQA_PREBUILT_DEFINE_FORWARD)
