// CUDA kernel of t2i::cfg_sample (math in cfg_sample.h, semantics in cfg_sample.cpp).
//
// One block of 256 threads per caption row:
//   1. top_k in (1, I): the k-th largest mixed logit by an 8-pass radix select (8 bits a pass) over an
//      order-preserving 64-bit key of the double value, mixed logits recomputed from the input each pass
//      (two loads and three flops per column; L2-resident at I = 16,384), a 256-bin histogram in shared memory;
//   2. every thread scores its columns (4 consecutive columns share one Philox call) and keeps its best;
//   3. a block reduction picks the maximum score, ties to the smaller column, as torch.argmax does.
// Compiled with --fmad=false: no FMA contraction, so each double operation rounds exactly as on the CPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cfg_sample.h"
#include "cfg_sample_cuda.h"

namespace t2i {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ double load_logit(const float* p, int64_t j) { return static_cast<double>(p[j]); }
__device__ __forceinline__ double load_logit(const __half* p, int64_t j) {
  return static_cast<double>(__half2float(p[j]));
}
__device__ __forceinline__ double load_logit(const __nv_bfloat16* p, int64_t j) {
  return static_cast<double>(__bfloat162float(p[j]));
}

template <typename T>
__device__ __forceinline__ double mixed_logit(const T* cond, const T* uncond, double cfg_scale, int64_t j) {
  const double c = load_logit(cond, j);
  return uncond != nullptr ? cfg_mix(c, load_logit(uncond, j), cfg_scale) : c;
}

// Ascending order of doubles as unsigned integers (sign bit flipped for >= 0, all bits for < 0).
__device__ __forceinline__ uint64_t order_key(double x) {
  const uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
  return (bits >> 63) ? ~bits : (bits | 0x8000000000000000ull);
}

__device__ __forceinline__ double from_order_key(uint64_t key) {
  const uint64_t bits = (key >> 63) ? (key & 0x7fffffffffffffffull) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

// The k-th largest mixed logit of the row (k >= 1), identical in value to std::nth_element's.
template <typename T>
__device__ double kth_largest(const T* cond, const T* uncond, double cfg_scale, int64_t width, int64_t k) {
  __shared__ unsigned int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_remaining;
  uint64_t prefix = 0, prefix_mask = 0;
  int64_t remaining = k;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t j = threadIdx.x; j < width; j += kThreads) {
      const uint64_t key = order_key(mixed_logit(cond, uncond, cfg_scale, j));
      if ((key & prefix_mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // walk the digits from the largest until the k-th element is inside
      int64_t above = 0;
      int digit = 255;
      for (; digit > 0; --digit) {
        if (above + hist[digit] >= remaining) break;
        above += hist[digit];
      }
      s_prefix = prefix | (static_cast<uint64_t>(digit) << shift);
      s_remaining = remaining - above;
    }
    __syncthreads();
    prefix = s_prefix;
    remaining = s_remaining;
    prefix_mask |= 0xffull << shift;
  }
  return from_order_key(prefix);
}

// Is (s, j) better than (best, best_j)? Larger score, then the smaller column.
__device__ __forceinline__ bool better(double s, int64_t j, double best, int64_t best_j) {
  return s > best || (s == best && j < best_j);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cfg_sample_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t image_start, int64_t width,
                      int64_t b, bool guided, const int64_t* __restrict__ keys, const int64_t* __restrict__ step,
                      double cfg_scale, double inv_temperature, int64_t top_k, int64_t* __restrict__ codes) {
  const int64_t row = blockIdx.x;
  const T* cond = logits + row * row_stride + image_start;
  const T* uncond = guided ? logits + (b + row) * row_stride + image_start : nullptr;
  const bool greedy = top_k == 1;
  const double neg_inf = -__longlong_as_double(0x7ff0000000000000ll);
  const double kth =
      (top_k > 1 && top_k < width) ? kth_largest(cond, uncond, cfg_scale, width, top_k) : neg_inf;

  const uint64_t seed = static_cast<uint64_t>(keys[2 * row]);
  const uint64_t caption = static_cast<uint64_t>(keys[2 * row + 1]);
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c1 = static_cast<uint32_t>(*step);
  const uint32_t c2 = static_cast<uint32_t>(caption), c3 = static_cast<uint32_t>(caption >> 32);

  double best = neg_inf;
  int64_t best_j = width;  // sentinel: nothing scored above -inf
  for (int64_t j4 = 4 * static_cast<int64_t>(threadIdx.x); j4 < width; j4 += 4 * kThreads) {
    const int lanes = width - j4 < 4 ? static_cast<int>(width - j4) : 4;
    double m[4];  // fully unrolled below: registers, not a stack array
    bool any = false;
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      m[l] = l < lanes ? mixed_logit(cond, uncond, cfg_scale, j4 + l) : neg_inf;
      any |= l < lanes && m[l] >= kth;
    }
    if (greedy) {
#pragma unroll
      for (int l = 0; l < 4; ++l)
        if (l < lanes && m[l] > best) best = m[l], best_j = j4 + l;
      continue;
    }
    if (!any) continue;
    const U32x4 bits = philox4x32_10(static_cast<uint32_t>(j4 / 4), c1, c2, c3, k0, k1);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      if (l >= lanes || !(m[l] >= kth)) continue;
      const double score = m[l] * inv_temperature + gumbel_from_bits(bits.v[l]);
      if (score > best) best = score, best_j = j4 + l;
    }
  }

  // Block argmax: warp shuffles, then the first warp over the per-warp winners.
  for (int offset = 16; offset > 0; offset >>= 1) {
    const double s = __shfl_down_sync(0xffffffffu, best, offset);
    const int64_t j = __shfl_down_sync(0xffffffffu, best_j, offset);
    if (better(s, j, best, best_j)) best = s, best_j = j;
  }
  __shared__ double warp_best[kWarps];
  __shared__ int64_t warp_j[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_best[warp] = best, warp_j[warp] = best_j;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w)
      if (better(warp_best[w], warp_j[w], best, best_j)) best = warp_best[w], best_j = warp_j[w];
    codes[row] = best_j == width ? 0 : best_j;  // every score -inf: column 0, as torch.argmax
  }
}

}  // namespace

cudaError_t launch_cfg_sample(const void* logits, int dtype, int64_t row_stride, int64_t image_start, int64_t width,
                              int64_t b, bool guided, const int64_t* keys, const int64_t* step, double cfg_scale,
                              double inv_temperature, int64_t top_k, int64_t* codes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned int>(b)), block(kThreads);
  switch (dtype) {
    case 0:
      cfg_sample_kernel<float><<<grid, block, 0, stream>>>(static_cast<const float*>(logits), row_stride, image_start,
                                                           width, b, guided, keys, step, cfg_scale, inv_temperature,
                                                           top_k, codes);
      break;
    case 1:
      cfg_sample_kernel<__half><<<grid, block, 0, stream>>>(static_cast<const __half*>(logits), row_stride,
                                                            image_start, width, b, guided, keys, step, cfg_scale,
                                                            inv_temperature, top_k, codes);
      break;
    default:
      cfg_sample_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(logits),
                                                                   row_stride, image_start, width, b, guided, keys,
                                                                   step, cfg_scale, inv_temperature, top_k, codes);
  }
  return cudaGetLastError();
}

}  // namespace t2i
