// gqa/gqa.hpp — umbrella header: everything gqa offers.
//
//   gqa/types.hpp        Index, Dynamic, Tensor4, TensorRef, head_major, span, bfloat16/half
//   gqa/errors.hpp       exception types
//   gqa/options.hpp      AttentionOptions, BiasView: masks, window, soft-cap and their order
//   gqa/attention.hpp    attention / mha / mqa kernels (MHA, GQA, MQA)
//   gqa/reference.hpp    naive double-precision attention (oracle and baseline)
//   gqa/kv_cache.hpp     head-major KV cache and decode against it
//   gqa/convert.hpp      MHA -> GQA/MQA checkpoint conversion (mean-pool K/V heads)
//   gqa/safetensors.hpp  safetensors read (mmap) / write (atomic)
//   gqa/checkpoint.hpp   convert a Hugging Face safetensors checkpoint's K/V heads (the gqa-convert tool)
#pragma once

#include "gqa/types.hpp"
#include "gqa/errors.hpp"
#include "gqa/options.hpp"
#include "gqa/attention.hpp"
#include "gqa/reference.hpp"
#if __has_include("gqa/kv_cache.hpp")
#include "gqa/kv_cache.hpp"
#endif
#if __has_include("gqa/convert.hpp")
#include "gqa/convert.hpp"
#endif
#if __has_include("gqa/safetensors.hpp")
#include "gqa/safetensors.hpp"
#endif
#if __has_include("gqa/checkpoint.hpp")
#include "gqa/checkpoint.hpp"
#endif
