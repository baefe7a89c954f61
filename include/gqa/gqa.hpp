// gqa/gqa.hpp — umbrella header: everything of the gqa::gqa target (Eigen and OpenMP only).
//
//   gqa/version.hpp      GQA_VERSION_MAJOR / MINOR / PATCH
//   gqa/types.hpp        Index, Dynamic, Tensor4, TensorRef, head_major, span, bfloat16/half
//   gqa/errors.hpp       exception types, e.id(), and the table of ids (gqa::error_ids)
//   gqa/options.hpp      AttentionOptions, BiasView: masks, window, soft-cap and their order
//   gqa/attention.hpp    attention / mha / mqa kernels (MHA, GQA, MQA)
//   gqa/attention_backward.hpp  gradients of attention (dQ; dK, dV summed per group)
//   gqa/reference.hpp    naive double-precision attention (oracle and baseline)
//   gqa/kv_cache.hpp     head-major KV cache and decode against it
//   gqa/paged_kv_cache.hpp  paged KV cache (blocks, prefix sharing) and batched decode against it
//   gqa/convert.hpp      MHA -> GQA/MQA conversion math on tensors and buffers (mean-pool K/V heads)
//
// Not included: checkpoint file I/O, which needs nlohmann_json and POSIX and comes with the gqa::checkpoint target.
// Include those headers yourself:
//   gqa/safetensors.hpp  safetensors read (mmap) / write (atomic)
//   gqa/checkpoint_plan.hpp  the conversion plan of a checkpoint, built without file I/O
//   gqa/checkpoint.hpp   convert a Hugging Face safetensors checkpoint's K/V heads (the gqa-convert tool)
#pragma once

#include "gqa/attention.hpp"
#include "gqa/attention_backward.hpp"
#include "gqa/convert.hpp"
#include "gqa/errors.hpp"
#include "gqa/kv_cache.hpp"
#include "gqa/paged_kv_cache.hpp"
#include "gqa/options.hpp"
#include "gqa/reference.hpp"
#include "gqa/types.hpp"
#include "gqa/version.hpp"
