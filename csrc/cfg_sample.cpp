// t2i::cfg_sample: classifier-free-guided, temperature / top-k Gumbel-max sampling of image codes from a
// counter-based generator, so that a caption's image depends only on (caption index, seed, model).
//
//   cfg_sample(logits (R, V) float, keys (b, 2) int64 [seed, caption index], step () int64,
//              image_start, image_end, cfg_scale, temperature, top_k) -> codes (b,) int64 in [0, I)
//
// R == 2b: rows [cond; uncond] (batched CFG), mixed over the image slice [image_start, image_end) as
// uncond + cfg_scale * (cond - uncond); R == b: no guidance (cfg_scale must then be 0). top_k == 0 keeps
// every column, top_k == 1 is the argmax of the mixed logits (no noise). The math is in cfg_sample.h;
// the pure-torch reference is t2i_kernels.cfg_sample.cfg_sample_ref.
//
// This file: input checks, the CPU kernel (rows in parallel), the schema (TORCH_LIBRARY_FRAGMENT, beside
// the namespace's Python-defined ops) and, built with -DT2I_WITH_CUDA, the CUDA dispatch into
// cfg_sample.cu. The fake (meta) kernel for torch.compile is registered from Python (t2i_csrc).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <limits>
#include <vector>

#include "cfg_sample.h"

#ifdef T2I_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cfg_sample_cuda.h"
#endif

namespace t2i {
namespace {

struct Problem {
  int64_t b = 0;       // captions (output rows)
  int64_t width = 0;   // I = image_end - image_start
  bool guided = false;
};

Problem check_inputs(const at::Tensor& logits, const at::Tensor& keys, const at::Tensor& step, int64_t image_start,
                     int64_t image_end, double cfg_scale, double temperature, int64_t top_k) {
  TORCH_CHECK(logits.dim() == 2, "cfg_sample: logits must be (R, V), got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                  logits.scalar_type() == at::kBFloat16,
              "cfg_sample: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1, "cfg_sample: logits rows must be contiguous (stride(1) == 1)");
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == 2 && keys.scalar_type() == at::kLong && keys.is_contiguous(),
              "cfg_sample: keys must be a contiguous (b, 2) int64 tensor [seed, caption index], got ",
              keys.sizes(), " ", keys.scalar_type());
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong, "cfg_sample: step must be one int64");
  TORCH_CHECK(keys.device() == logits.device() && step.device() == logits.device(),
              "cfg_sample: logits, keys and step must be on one device");
  Problem p;
  p.b = keys.size(0);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(p.b > 0 && (rows == p.b || rows == 2 * p.b),
              "cfg_sample: logits must have b or 2b rows for b = ", p.b, " keys, got ", rows);
  p.guided = rows == 2 * p.b;
  TORCH_CHECK(p.guided || cfg_scale == 0.0, "cfg_sample: cfg_scale ", cfg_scale,
              " needs 2b rows [cond; uncond], got b = ", p.b);
  TORCH_CHECK(0 <= image_start && image_start < image_end && image_end <= logits.size(1),
              "cfg_sample: image range [", image_start, ", ", image_end, ") outside [0, ", logits.size(1), ")");
  TORCH_CHECK(temperature > 0.0, "cfg_sample: temperature must be > 0 (top_k = 1 is greedy), got ", temperature);
  TORCH_CHECK(top_k >= 0, "cfg_sample: top_k must be >= 0 (0 = all), got ", top_k);
  p.width = image_end - image_start;
  return p;
}

// Upper bounds of gumbel_from_bits over the 4,096 buckets of its argument's top 12 bits. gumbel_from_bits grows
// with its argument, so bucket k is bounded by its value at the bucket's last argument; the margin (1e-9, far
// above the ~1e-15 rounding of log_portable) keeps the bound valid even where rounding is not monotone.
constexpr int kBucketShift = 20;
const std::vector<double>& gumbel_bucket_bounds() {
  static const std::vector<double> bounds = [] {
    std::vector<double> b(1u << (32 - kBucketShift));
    for (uint64_t k = 0; k < b.size(); ++k)
      b[k] = gumbel_from_bits(static_cast<uint32_t>(((k + 1) << kBucketShift) - 1)) + 1e-9;
    return b;
  }();
  return bounds;
}

struct RowScratch {
  std::vector<double> m, bound, select;  // mixed logits; score upper bounds; nth_element copy
  std::vector<uint32_t> bits;             // the column's 32 random bits
};

// One caption row: mixed logits, k-th largest threshold, Gumbel-max over the kept columns.
//
// Exact pruning (the result is that of scoring every column): with s_j = m_j / T + g_j and the bucket bound
// G_j >= g_j, ub_j = m_j / T + G_j >= s_j (rounding is monotone). The winner w has s_w >= s_{j0} for any kept
// j0, so ub_w >= s_{j0}: only columns with ub_j >= s_{j0} need the exact score (two logs). Taking j0 = argmax ub
// leaves a handful of them out of 16,384; everything else costs a share of one Philox call and a table lookup.
template <typename T>
int64_t sample_row(const T* cond, const T* uncond, double cfg_scale, double inv_temperature, int64_t top_k,
                   int64_t width, uint64_t seed, uint64_t caption, uint32_t step, RowScratch& r) {
  for (int64_t j = 0; j < width; ++j) {
    const double c = static_cast<double>(static_cast<float>(cond[j]));
    r.m[j] = uncond ? cfg_mix(c, static_cast<double>(static_cast<float>(uncond[j])), cfg_scale) : c;
  }
  if (top_k == 1) {  // greedy: the first maximum of the mixed logits
    return std::max_element(r.m.begin(), r.m.begin() + width) - r.m.begin();
  }
  const double neg_inf = -std::numeric_limits<double>::infinity();
  double kth = neg_inf;
  if (top_k > 0 && top_k < width) {
    r.select.assign(r.m.begin(), r.m.begin() + width);
    std::nth_element(r.select.begin(), r.select.begin() + (top_k - 1), r.select.end(), std::greater<double>());
    kth = r.select[top_k - 1];  // keep m >= k-th largest (ties at the threshold are all kept)
  }
  const std::vector<double>& bucket = gumbel_bucket_bounds();
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(caption), c3 = static_cast<uint32_t>(caption >> 32);
  int64_t j0 = 0;
  for (int64_t j4 = 0; j4 < width; j4 += 4) {  // 1. random bits and score upper bounds of the kept columns
    const int64_t lanes = std::min<int64_t>(4, width - j4);
    bool any = false;
    for (int64_t l = 0; l < lanes; ++l) any |= r.m[j4 + l] >= kth;
    if (!any) {  // no kept column here (most blocks under top-k): no random numbers needed
      for (int64_t l = 0; l < lanes; ++l) r.bound[j4 + l] = neg_inf;
      continue;
    }
    const U32x4 bits = philox4x32_10(static_cast<uint32_t>(j4 / 4), step, c2, c3, k0, k1);
    for (int64_t l = 0; l < lanes; ++l) {
      const int64_t j = j4 + l;
      r.bits[j] = bits.v[l];
      r.bound[j] = r.m[j] >= kth ? r.m[j] * inv_temperature + bucket[bits.v[l] >> kBucketShift] : neg_inf;
      if (r.bound[j] > r.bound[j0]) j0 = j;
    }
  }
  if (!(r.bound[j0] > neg_inf)) return 0;  // every kept score is -inf: column 0, as torch.argmax
  const double floor = r.m[j0] * inv_temperature + gumbel_from_bits(r.bits[j0]);  // 2. a score the winner beats
  double best = neg_inf;
  int64_t best_j = 0;
  for (int64_t j = 0; j < width; ++j) {  // 3. exact scores of the columns that can reach it
    if (!(r.bound[j] >= floor)) continue;
    const double score = r.m[j] * inv_temperature + gumbel_from_bits(r.bits[j]);
    if (score > best) {  // strict: the first index wins ties, as torch.argmax
      best = score;
      best_j = j;
    }
  }
  return best_j;
}

template <typename T>
void cfg_sample_cpu_typed(const at::Tensor& logits, const at::Tensor& keys, int64_t step, int64_t image_start,
                          const Problem& p, double cfg_scale, double temperature, int64_t top_k, at::Tensor& out) {
  const T* base = logits.data_ptr<T>() + image_start;
  const int64_t row_stride = logits.stride(0);
  const int64_t* key = keys.data_ptr<int64_t>();
  int64_t* codes = out.data_ptr<int64_t>();
  const double inv_temperature = 1.0 / temperature;
  at::parallel_for(0, p.b, 1, [&](int64_t begin, int64_t end) {
    RowScratch scratch;
    scratch.m.resize(p.width);
    scratch.bound.resize(p.width);
    scratch.bits.resize(p.width);
    for (int64_t i = begin; i < end; ++i) {
      const T* cond = base + i * row_stride;
      const T* uncond = p.guided ? base + (p.b + i) * row_stride : nullptr;
      codes[i] = sample_row<T>(cond, uncond, cfg_scale, inv_temperature, top_k, p.width,
                               static_cast<uint64_t>(key[2 * i]), static_cast<uint64_t>(key[2 * i + 1]),
                               static_cast<uint32_t>(step), scratch);
    }
  });
}

at::Tensor cfg_sample_cpu(const at::Tensor& logits, const at::Tensor& keys, const at::Tensor& step,
                          int64_t image_start, int64_t image_end, double cfg_scale, double temperature,
                          int64_t top_k) {
  const Problem p = check_inputs(logits, keys, step, image_start, image_end, cfg_scale, temperature, top_k);
  at::Tensor out = at::empty({p.b}, keys.options());
  const int64_t t = step.item<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat:
      cfg_sample_cpu_typed<float>(logits, keys, t, image_start, p, cfg_scale, temperature, top_k, out);
      break;
    case at::kHalf:
      cfg_sample_cpu_typed<c10::Half>(logits, keys, t, image_start, p, cfg_scale, temperature, top_k, out);
      break;
    default:
      cfg_sample_cpu_typed<c10::BFloat16>(logits, keys, t, image_start, p, cfg_scale, temperature, top_k, out);
  }
  return out;
}

#ifdef T2I_WITH_CUDA
at::Tensor cfg_sample_cuda(const at::Tensor& logits, const at::Tensor& keys, const at::Tensor& step,
                           int64_t image_start, int64_t image_end, double cfg_scale, double temperature,
                           int64_t top_k) {
  const Problem p = check_inputs(logits, keys, step, image_start, image_end, cfg_scale, temperature, top_k);
  c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor out = at::empty({p.b}, keys.options());
  const int dtype = logits.scalar_type() == at::kFloat ? 0 : logits.scalar_type() == at::kHalf ? 1 : 2;
  // The step is read on the device: a captured CUDA graph replays with the step tensor's current value.
  const cudaError_t err = launch_cfg_sample(
      logits.data_ptr(), dtype, logits.stride(0), image_start, p.width, p.b, p.guided, keys.data_ptr<int64_t>(),
      step.data_ptr<int64_t>(), cfg_scale, 1.0 / temperature, top_k, out.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "cfg_sample: CUDA launch failed: ", cudaGetErrorString(err));
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(t2i, m) {
  m.def(
      "cfg_sample(Tensor logits, Tensor keys, Tensor step, int image_start, int image_end, float cfg_scale, "
      "float temperature, int top_k) -> Tensor");
}

TORCH_LIBRARY_IMPL(t2i, CPU, m) { m.impl("cfg_sample", &cfg_sample_cpu); }

#ifdef T2I_WITH_CUDA
TORCH_LIBRARY_IMPL(t2i, CUDA, m) { m.impl("cfg_sample", &cfg_sample_cuda); }
#endif

}  // namespace t2i
