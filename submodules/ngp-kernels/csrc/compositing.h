// Front-to-back compositing of packed samples and its gradient. No XLA types here.
//
// Computes the function of the pure-JAX twin `fields.rendering.volume.composite_reference`:
//   segments: maximal runs of equal ray_indices (a new one starts where ray_indices[i] differs
//             from ray_indices[i - 1], exactly as the twin's segmented scan restarts);
//   tau_i = valid_i ? sigma_i * dt_i : 0;   T_i = exp(-sum_{j < i in the segment} tau_j)
//   alive_i = valid_i and T_i >= threshold;  w_i = alive_i ? T_i * (1 - exp(-tau_i)) : 0
//   colour[r] = sum w_i c_i,  opacity[r] = sum w_i,  depth[r] = sum w_i t_i   over segments with
//   ray index r in [0, R) (other indices, e.g. the padding index R, are dropped).
// Contract (met by march_rays): the samples of a ray form one contiguous run.
//
// Gradient (alive_i held constant, as autodiff of the twin does), with
//   g_i = c_i . dC[r] + dO[r] + t_i dD[r]:
//   d rgb_i   = w_i dC[r]
//   d sigma_i = valid_i * dt_i * (alive_i T_i exp(-tau_i) g_i - sum_{k > i in the segment} w_k g_k)
// (dw_k / dtau_i = -w_k for k > i, and dw_i / dtau_i = alive_i T_i exp(-tau_i)). Samples past
// termination get exactly zero (their own term is masked and every later w_k is 0 when densities
// are non-negative). The suffix sums are accumulated back to front, one segment per thread, so the
// results are bitwise deterministic.
#pragma once

#include <cstdint>

#include "marching.h"  // NGP_VOL_HD, vol:: float helpers

namespace ngp_kernels {

struct CompositeInputs {
  const float* sigmas;         // [S]
  const float* rgbs;           // [S, 3]
  const float* ts;             // [S]
  const float* dts;            // [S]
  const int32_t* ray_indices;  // [S]
  const bool* valid;           // [S]
  int64_t num_samples;         // S
  int64_t num_rays;            // R
  float threshold;             // termination threshold on T
};

namespace vol {

NGP_VOL_HD bool SegmentStart(const int32_t* ray_indices, int64_t i) {
  return i == 0 || ray_indices[i] != ray_indices[i - 1];
}

NGP_VOL_HD int64_t SegmentEnd(const int32_t* ray_indices, int64_t begin, int64_t S) {
  const int32_t r = ray_indices[begin];
  int64_t end = begin + 1;
  while (end < S && ray_indices[end] == r) ++end;
  return end;
}

NGP_VOL_HD bool RayInRange(int32_t r, int64_t R) { return r >= 0 && static_cast<int64_t>(r) < R; }

// Composites samples [begin, end) of ray r = ray_indices[begin] into colour[r], opacity[r], depth[r]
// (added: the outputs start at zero).
NGP_VOL_HD void CompositeSegment(const CompositeInputs& in, int64_t begin, int64_t end,
                                 float* colour, float* opacity, float* depth) {
  float acc = 0.0f;  // exclusive sum of tau
  float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, op = 0.0f, dp = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const bool v = in.valid[i];
    const float tau = v ? Mul(in.sigmas[i], in.dts[i]) : 0.0f;
    const float T = Exp(-acc);
    if (v && T >= in.threshold) {
      const float w = Mul(T, Sub(1.0f, Exp(-tau)));
      c0 = Add(c0, Mul(w, in.rgbs[3 * i + 0]));
      c1 = Add(c1, Mul(w, in.rgbs[3 * i + 1]));
      c2 = Add(c2, Mul(w, in.rgbs[3 * i + 2]));
      op = Add(op, w);
      dp = Add(dp, Mul(w, in.ts[i]));
    }
    acc = Add(acc, tau);
  }
  const int64_t r = in.ray_indices[begin];
  colour[3 * r + 0] += c0;
  colour[3 * r + 1] += c1;
  colour[3 * r + 2] += c2;
  opacity[r] += op;
  depth[r] += dp;
}

// Gradient of samples [begin, end) of ray r = ray_indices[begin]. Two passes over the segment: the
// forward one stores, per sample, a_i = alive T_i exp(-tau_i) g_i in d_sigmas[i] and (w_i, w_i g_i)
// in d_rgbs[i][0:2] (the outputs double as scratch); the backward one accumulates the suffix sums
// and writes the final values.
NGP_VOL_HD void CompositeSegmentBackward(const CompositeInputs& in, int64_t begin, int64_t end,
                                         const float* d_colour, const float* d_opacity,
                                         const float* d_depth, float* d_sigmas, float* d_rgbs) {
  const int64_t r = in.ray_indices[begin];
  const float gc0 = d_colour[3 * r + 0], gc1 = d_colour[3 * r + 1], gc2 = d_colour[3 * r + 2];
  const float go = d_opacity[r], gd = d_depth[r];
  float acc = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const bool v = in.valid[i];
    const float tau = v ? Mul(in.sigmas[i], in.dts[i]) : 0.0f;
    const float T = Exp(-acc);
    float a = 0.0f, w = 0.0f, wg = 0.0f;
    if (v && T >= in.threshold) {
      const float e = Exp(-tau);
      w = Mul(T, Sub(1.0f, e));
      const float g = Add(Add(Add(Add(Mul(in.rgbs[3 * i + 0], gc0), Mul(in.rgbs[3 * i + 1], gc1)),
                                  Mul(in.rgbs[3 * i + 2], gc2)),
                              go),
                          Mul(in.ts[i], gd));
      a = Mul(Mul(T, e), g);
      wg = Mul(w, g);
    }
    d_sigmas[i] = a;
    d_rgbs[3 * i + 0] = w;
    d_rgbs[3 * i + 1] = wg;
    acc = Add(acc, tau);
  }
  float suffix = 0.0f;  // sum_{k > i} w_k g_k
  for (int64_t i = end - 1; i >= begin; --i) {
    const float a = d_sigmas[i], w = d_rgbs[3 * i + 0], wg = d_rgbs[3 * i + 1];
    d_sigmas[i] = in.valid[i] ? Mul(in.dts[i], Sub(a, suffix)) : 0.0f;
    suffix = Add(suffix, wg);
    d_rgbs[3 * i + 0] = Mul(w, gc0);
    d_rgbs[3 * i + 1] = Mul(w, gc1);
    d_rgbs[3 * i + 2] = Mul(w, gc2);
  }
}

}  // namespace vol

// CPU forward: colour [R, 3], opacity [R], depth [R]. Work is split into sample ranges; a range
// owns the segments that start in it, each composited sequentially by one thread, so the bits do
// not depend on the thread count.
void CompositeForwardCpu(const CompositeInputs& in, float* colour, float* opacity, float* depth);

// CPU backward: d_sigmas [S], d_rgbs [S, 3] from d_colour [R, 3], d_opacity [R], d_depth [R].
void CompositeBackwardCpu(const CompositeInputs& in, const float* d_colour, const float* d_opacity,
                          const float* d_depth, float* d_sigmas, float* d_rgbs);

#ifdef NGP_KERNELS_WITH_CUDA
// CUDA versions (device pointers, enqueued on `stream`): one thread per segment start.
cudaError_t CompositeForwardCuda(cudaStream_t stream, const CompositeInputs& in, float* colour,
                                 float* opacity, float* depth);
cudaError_t CompositeBackwardCuda(cudaStream_t stream, const CompositeInputs& in,
                                  const float* d_colour, const float* d_opacity,
                                  const float* d_depth, float* d_sigmas, float* d_rgbs);
#endif

}  // namespace ngp_kernels
