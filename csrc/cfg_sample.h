// The arithmetic of t2i::cfg_sample, shared by the CPU (cfg_sample.cpp) and CUDA (cfg_sample.cu) code.
//
// Every function here uses only IEEE-754 operations that are correctly rounded on every target (integer
// ops, double +, -, *, /, frexp) and the sources are compiled without FMA contraction (-ffp-contract=off,
// nvcc --fmad=false). The pure-torch reference t2i_kernels.cfg_sample.cfg_sample_ref performs the same
// operations in the same order on float64 tensors, so op and reference give the same codes bit for bit,
// on CPU and GPU alike. Do not "simplify" an expression here without changing the reference the same way.
//
// Per caption row, with key (seed, caption) and decode step t, column j of the image slice gets
//
//   bits  = Philox4x32-10(counter = (j / 4, t, caption_lo, caption_hi), key = (seed_lo, seed_hi))[j % 4]
//   u     = (bits + 0.5) * 2^-32                          in (0, 1), exact in double
//   g     = -log(-log(u))                                 a standard Gumbel variate (log_portable twice)
//   m     = u_logit + cfg_scale * (c_logit - u_logit)     (guided rows) or the logit (unguided), double
//   score = m * (1 / temperature) + g                     for kept columns (m >= k-th largest m)
//   code  = argmax_j score  (first index among equal maxima);   top_k == 1: argmax_j m
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define T2I_HD __host__ __device__ __forceinline__
#include <math.h>
#else
#define T2I_HD inline
#include <cmath>
#endif

namespace t2i {

// Philox4x32 constants (Salmon et al., SC'11; Random123, curand and Triton use the same).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct U32x4 {
  uint32_t v[4];
};

// Philox4x32-10: 10 rounds; the key is bumped by (W0, W1) after every round.
T2I_HD U32x4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;  // exact 64-bit products
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return U32x4{{c0, c1, c2, c3}};
}

constexpr double kLn2 = 0.6931471805599453;
constexpr double kSqrtHalf = 0.7071067811865476;
constexpr double kTwoPowMinus32 = 2.3283064365386963e-10;

// Natural log of a finite y > 0 from correctly rounded operations only (libm's log differs between glibc,
// CUDA and torch's vectorised kernels in the last bit). y = m 2^e with m in [sqrt(1/2), sqrt(2));
// log m = 2 atanh(s) = 2 s sum_k s^(2k) / (2k + 1), s = (m - 1) / (m + 1), |s| <= 0.172: 11 terms leave a
// truncation error below 1e-17 relative.
T2I_HD double log_portable(double y) {
  int e = 0;
  double m = frexp(y, &e);  // m in [0.5, 1), exact
  if (m < kSqrtHalf) {
    m = m * 2.0;  // exact
    e = e - 1;
  }
  const double s = (m - 1.0) / (m + 1.0);
  const double s2 = s * s;
  // Horner over 1 / (2k + 1), k = 10 .. 0, written as the shortest decimals that round-trip (Python's repr),
  // so the compiler and Python hold the same doubles.
  double p = 0.047619047619047616;
  p = p * s2 + 0.05263157894736842;
  p = p * s2 + 0.058823529411764705;
  p = p * s2 + 0.06666666666666667;
  p = p * s2 + 0.07692307692307693;
  p = p * s2 + 0.09090909090909091;
  p = p * s2 + 0.1111111111111111;
  p = p * s2 + 0.14285714285714285;
  p = p * s2 + 0.2;
  p = p * s2 + 0.3333333333333333;
  p = p * s2 + 1.0;
  return static_cast<double>(e) * kLn2 + (s + s) * p;
}

// 32 random bits -> a standard Gumbel variate, -log(-log(u)), u = (bits + 0.5) 2^-32 in (0, 1).
T2I_HD double gumbel_from_bits(uint32_t bits) {
  const double u = (static_cast<double>(bits) + 0.5) * kTwoPowMinus32;
  const double e = -log_portable(u);  // Exp(1) variate, > 0
  return -log_portable(e);
}

// The mixed logit of one column (double, as the reference computes it).
T2I_HD double cfg_mix(double cond, double uncond, double cfg_scale) {
  const double diff = cond - uncond;
  const double scaled = cfg_scale * diff;
  return uncond + scaled;
}

}  // namespace t2i
