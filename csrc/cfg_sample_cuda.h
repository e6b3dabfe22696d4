// The launcher of the CUDA kernel of t2i::cfg_sample (cfg_sample.cu). Plain CUDA types only: the .cu file
// includes no torch header, so `nvcc -c cfg_sample.cu` works with the CUDA toolkit alone (the sm_80 /
// sm_90a compile gate runs on machines without a GPU or a CUDA build of torch).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace t2i {

// logits: (R, V) with row stride `row_stride` elements; dtype 0 = float32, 1 = float16, 2 = bfloat16.
// keys: (b, 2) int64 [seed, caption index]; step: one int64 on the device; codes: (b,) int64 output.
cudaError_t launch_cfg_sample(const void* logits, int dtype, int64_t row_stride, int64_t image_start, int64_t width,
                              int64_t b, bool guided, const int64_t* keys, const int64_t* step, double cfg_scale,
                              double inv_temperature, int64_t top_k, int64_t* codes, cudaStream_t stream);

}  // namespace t2i
