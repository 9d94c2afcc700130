// CUDA core of the hash-grid encoding (see hash_grid_cuda.h). One thread per (point, level) for
// the forward and table-gradient kernels (grid: x = point blocks, y = level, z = fields), one
// thread per point for the position gradient (levels summed in order, deterministic).
#include <cuda_runtime.h>

#include <algorithm>

#include "hash_grid_cuda.h"

namespace ngp_kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxGridZ = 65535;

template <int D>
struct CornerSet {
  static constexpr int C = 1 << D;
  uint32_t rows[C];  // row within the level
  float w[C];        // d-linear weights
  float frac[D];
};

template <int D>
__device__ __forceinline__ void ComputeCorners(const Level& lv, const float* __restrict__ p,
                                               CornerSet<D>& cs) {
  uint32_t cell[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    // One rounding (FMA), as XLA's fused code computes x * scale + 0.5 (see hash_grid.cc).
    const float s = __fmaf_rn(p[d], lv.scale, 0.5f);
    const float fl = floorf(s);
    cs.frac[d] = __fsub_rn(s, fl);
    cell[d] = static_cast<uint32_t>(static_cast<int32_t>(fl));
  }
#pragma unroll
  for (int c = 0; c < CornerSet<D>::C; ++c) {
    uint32_t idx;
    if (lv.dense) {
      idx = 0;
#pragma unroll
      for (int d = 0; d < D; ++d) idx += (cell[d] + ((c >> d) & 1)) * lv.stride[d];
    } else {
      idx = cell[0] + (c & 1);
      idx ^= (cell[1] + ((c >> 1) & 1)) * kPrime1;
      if (D == 3) idx ^= (cell[D - 1] + ((c >> 2) & 1)) * kPrime2;
    }
    cs.rows[c] = lv.pow2 ? (idx & lv.mask) : (idx % lv.size);
    float w = 1.0f;
#pragma unroll
    for (int d = 0; d < D; ++d) w = __fmul_rn(w, ((c >> d) & 1) ? cs.frac[d] : 1.0f - cs.frac[d]);
    cs.w[c] = w;
  }
}

template <int D>
__global__ void ForwardKernel(const __grid_constant__ Grid grid, const __grid_constant__ FieldBroadcast fb, int64_t B, const float* __restrict__ table,
                              const float* __restrict__ positions, float* __restrict__ out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int l = blockIdx.y;
  const int F = grid.features, LF = grid.num_levels * F;
  const int64_t E = grid.num_entries;
  const Level& lv = grid.levels[l];
  for (int64_t n = blockIdx.z; n < fb.num_fields(); n += gridDim.z) {
    const float* tab = table + fb.input_field(0, n) * E * F + lv.offset * F;
    const float* p = positions + (fb.input_field(1, n) * B + b) * D;
    CornerSet<D> cs;
    ComputeCorners<D>(lv, p, cs);
    float* o = out + (n * B + b) * LF + l * F;
    for (int f = 0; f < F; ++f) {
      float acc = 0.0f;
#pragma unroll
      for (int c = 0; c < CornerSet<D>::C; ++c) acc += cs.w[c] * __ldg(tab + cs.rows[c] * F + f);
      o[f] = acc;
    }
  }
}

template <int D>
__global__ void TableGradKernel(const __grid_constant__ Grid grid, const __grid_constant__ FieldBroadcast fb, int64_t B,
                                const float* __restrict__ positions, const float* __restrict__ d_out,
                                float* __restrict__ d_table) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int l = blockIdx.y;
  const int F = grid.features, LF = grid.num_levels * F;
  const int64_t E = grid.num_entries;
  const Level& lv = grid.levels[l];
  for (int64_t n = blockIdx.z; n < fb.num_fields(); n += gridDim.z) {
    const float* p = positions + (fb.input_field(1, n) * B + b) * D;
    const float* g = d_out + (fb.input_field(2, n) * B + b) * LF + l * F;
    float* dt = d_table + n * E * F + lv.offset * F;
    CornerSet<D> cs;
    ComputeCorners<D>(lv, p, cs);
    for (int f = 0; f < F; ++f) {
      const float gf = g[f];
#pragma unroll
      for (int c = 0; c < CornerSet<D>::C; ++c) atomicAdd(dt + cs.rows[c] * F + f, cs.w[c] * gf);
    }
  }
}

template <int D>
__global__ void PositionGradKernel(const __grid_constant__ Grid grid,
                                   const __grid_constant__ FieldBroadcast fb, int64_t B,
                                   const float* __restrict__ table, const float* __restrict__ positions,
                                   const float* __restrict__ d_out, float* __restrict__ d_positions) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= B) return;
  const int F = grid.features, L = grid.num_levels, LF = L * F;
  const int64_t E = grid.num_entries;
  constexpr int C = CornerSet<D>::C;
  for (int64_t n = blockIdx.z; n < fb.num_fields(); n += gridDim.z) {
    const float* tab = table + fb.input_field(0, n) * E * F;
    const float* p = positions + (fb.input_field(1, n) * B + b) * D;
    const float* g = d_out + (fb.input_field(2, n) * B + b) * LF;
    float grad[D] = {};
    for (int l = 0; l < L; ++l) {
      const Level& lv = grid.levels[l];
      CornerSet<D> cs;
      ComputeCorners<D>(lv, p, cs);
      float val[C];
#pragma unroll
      for (int c = 0; c < C; ++c) {
        float v = 0.0f;
        for (int f = 0; f < F; ++f) v += g[l * F + f] * __ldg(tab + (lv.offset + cs.rows[c]) * F + f);
        val[c] = v;
      }
#pragma unroll
      for (int d = 0; d < D; ++d) {
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) {
          float q = ((c >> d) & 1) ? val[c] : -val[c];
#pragma unroll
          for (int e = 0; e < D; ++e)
            if (e != d) q *= ((c >> e) & 1) ? cs.frac[e] : 1.0f - cs.frac[e];
          s += q;
        }
        grad[d] += s * lv.scale;
      }
    }
    float* dp = d_positions + (n * B + b) * D;
#pragma unroll
    for (int d = 0; d < D; ++d) dp[d] = grad[d];
  }
}

dim3 LaunchGrid(int64_t B, int levels, int64_t fields) {
  return dim3(static_cast<unsigned>((B + kThreads - 1) / kThreads), static_cast<unsigned>(levels),
              static_cast<unsigned>(std::min<int64_t>(fields, kMaxGridZ)));
}

}  // namespace

cudaError_t HashGridForwardCuda(cudaStream_t stream, const Grid& grid, const FieldBroadcast& fb,
                                int64_t num_points, const float* table, const float* positions,
                                float* out) {
  const int64_t N = fb.num_fields();
  if (N == 0 || num_points == 0) return cudaSuccess;
  const dim3 blocks = LaunchGrid(num_points, grid.num_levels, N);
  if (grid.num_dims == 2) {
    ForwardKernel<2><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, table, positions, out);
  } else {
    ForwardKernel<3><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, table, positions, out);
  }
  return cudaGetLastError();
}

cudaError_t HashGridBackwardCuda(cudaStream_t stream, const Grid& grid, const FieldBroadcast& fb,
                                 int64_t num_points, const float* table, const float* positions,
                                 const float* d_out, float* d_table, float* d_positions) {
  const int64_t N = fb.num_fields();
  if (d_table) {
    const size_t bytes = sizeof(float) * N * grid.num_entries * grid.features;
    if (cudaError_t err = cudaMemsetAsync(d_table, 0, bytes, stream); err != cudaSuccess) return err;
  }
  if (N == 0 || num_points == 0) return cudaSuccess;
  if (d_table) {
    const dim3 blocks = LaunchGrid(num_points, grid.num_levels, N);
    if (grid.num_dims == 2) {
      TableGradKernel<2><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, positions, d_out, d_table);
    } else {
      TableGradKernel<3><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, positions, d_out, d_table);
    }
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  if (d_positions) {
    const dim3 blocks = LaunchGrid(num_points, 1, N);
    if (grid.num_dims == 2) {
      PositionGradKernel<2><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, table, positions, d_out,
                                                             d_positions);
    } else {
      PositionGradKernel<3><<<blocks, kThreads, 0, stream>>>(grid, fb, num_points, table, positions, d_out,
                                                             d_positions);
    }
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace ngp_kernels
