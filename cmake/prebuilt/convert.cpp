// The fit conversion that prebuilt.hpp declares (see there and forward.cpp).
#define GQA_PREBUILT_DEFINE
#include "prebuilt.hpp"

#define GQA_PREBUILT_DEFINE_FIT(T) GQA_PREBUILT_FIT(, T)
GQA_PREBUILT_CONVERT_TYPES(GQA_PREBUILT_DEFINE_FIT)
