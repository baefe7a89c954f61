// The backward kernels that kernels.hpp declares (see there and forward.cpp).
#define GQA_PREBUILT_KERNELS_DEFINE
#include "kernels.hpp"

#define GQA_PREBUILT_DEFINE_BACKWARD(T, KVT) GQA_PREBUILT_BACKWARD(, T, KVT)
GQA_PREBUILT_KERNEL_TYPES(GQA_PREBUILT_DEFINE_BACKWARD)
