// gqa/detail/assert.hpp — debug-only invariants for kernels that trust validated params.
#pragma once

#include "gqa/detail/internal_header_check.hpp"

#include <cassert>

#ifndef GQA_ASSERT
#define GQA_ASSERT(x) assert(x)
#endif
