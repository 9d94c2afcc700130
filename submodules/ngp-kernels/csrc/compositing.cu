// CUDA core of compositing (see compositing.h): one thread per sample; the thread at a segment's
// first sample composites the whole segment sequentially (the same code as the CPU), so results
// are bitwise deterministic. Padding slots (ray index out of range) get zero gradient.
#include <cuda_runtime.h>

#include "compositing.h"

namespace ngp_kernels {
namespace {

constexpr int kThreads = 128;

__global__ void ForwardKernel(CompositeInputs in, float* __restrict__ colour,
                              float* __restrict__ opacity, float* __restrict__ depth) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= in.num_samples) return;
  if (!vol::RayInRange(in.ray_indices[i], in.num_rays) || !vol::SegmentStart(in.ray_indices, i)) return;
  vol::CompositeSegment(in, i, vol::SegmentEnd(in.ray_indices, i, in.num_samples), colour, opacity, depth);
}

__global__ void BackwardKernel(CompositeInputs in, const float* __restrict__ d_colour,
                               const float* __restrict__ d_opacity, const float* __restrict__ d_depth,
                               float* d_sigmas, float* d_rgbs) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= in.num_samples) return;
  if (!vol::RayInRange(in.ray_indices[i], in.num_rays)) {
    d_sigmas[i] = 0.0f;
    d_rgbs[3 * i + 0] = 0.0f;
    d_rgbs[3 * i + 1] = 0.0f;
    d_rgbs[3 * i + 2] = 0.0f;
    return;
  }
  if (!vol::SegmentStart(in.ray_indices, i)) return;
  vol::CompositeSegmentBackward(in, i, vol::SegmentEnd(in.ray_indices, i, in.num_samples), d_colour,
                                d_opacity, d_depth, d_sigmas, d_rgbs);
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace

cudaError_t CompositeForwardCuda(cudaStream_t stream, const CompositeInputs& in, float* colour,
                                 float* opacity, float* depth) {
  const size_t R = static_cast<size_t>(in.num_rays);
  if (cudaError_t e = cudaMemsetAsync(colour, 0, 3 * R * sizeof(float), stream); e != cudaSuccess) return e;
  if (cudaError_t e = cudaMemsetAsync(opacity, 0, R * sizeof(float), stream); e != cudaSuccess) return e;
  if (cudaError_t e = cudaMemsetAsync(depth, 0, R * sizeof(float), stream); e != cudaSuccess) return e;
  if (in.num_samples == 0) return cudaSuccess;
  ForwardKernel<<<Blocks(in.num_samples), kThreads, 0, stream>>>(in, colour, opacity, depth);
  return cudaGetLastError();
}

cudaError_t CompositeBackwardCuda(cudaStream_t stream, const CompositeInputs& in,
                                  const float* d_colour, const float* d_opacity,
                                  const float* d_depth, float* d_sigmas, float* d_rgbs) {
  if (in.num_samples == 0) return cudaSuccess;
  BackwardKernel<<<Blocks(in.num_samples), kThreads, 0, stream>>>(in, d_colour, d_opacity, d_depth,
                                                                  d_sigmas, d_rgbs);
  return cudaGetLastError();
}

}  // namespace ngp_kernels
