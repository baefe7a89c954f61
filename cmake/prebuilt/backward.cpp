// The backward kernels that prebuilt.hpp declares (see there and forward.cpp).
#define GQA_PREBUILT_DEFINE
#include "prebuilt.hpp"

#define GQA_PREBUILT_DEFINE_BACKWARD(T, KVT) GQA_PREBUILT_BACKWARD(, T, KVT)
GQA_PREBUILT_KERNEL_TYPES(GQA_PREBUILT_DEFINE_BACKWARD)
