// CUDA core of ray marching (see marching.h): one thread per ray for the count and write passes
// (the same MarchRay as the CPU, device float intrinsics keep every rounding identical), a cub
// exclusive scan over the per-ray counts in between, one thread per slot for the padding.
#include <cuda_runtime.h>

#include <cub/device/device_scan.cuh>

#include "marching.h"

namespace ngp_kernels {
namespace {

constexpr int kThreads = 128;
constexpr size_t kAlign = 256;

size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

size_t ScanTempBytes(int64_t R) {
  size_t bytes = 0;
  cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<const int32_t*>(nullptr),
                                static_cast<int32_t*>(nullptr), static_cast<int>(R));
  return bytes;
}

struct CountEmit {
  __device__ bool operator()(const vol::Candidate&) const { return true; }
};

struct WriteEmit {
  MarchOutputs out;
  float d0, d1, d2, dt;
  int32_t ray;
  int64_t slot, end;
  __device__ bool operator()(const vol::Candidate& c) {
    if (slot >= end) return false;
    out.positions[3 * slot + 0] = c.p[0];
    out.positions[3 * slot + 1] = c.p[1];
    out.positions[3 * slot + 2] = c.p[2];
    out.directions[3 * slot + 0] = d0;
    out.directions[3 * slot + 1] = d1;
    out.directions[3 * slot + 2] = d2;
    out.ts[slot] = c.t;
    out.dts[slot] = dt;
    out.ray_indices[slot] = ray;
    out.valid[slot] = true;
    ++slot;
    return slot < end;
  }
};

__global__ void CoarseKernel(const uint8_t* __restrict__ bitfield, int32_t G, uint8_t* __restrict__ coarse) {
  const int32_t Gc = (G + vol::kBlockCells - 1) >> vol::kBlockShift;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n = static_cast<int64_t>(Gc) * Gc * Gc;
  if (b >= n) return;
  const int32_t bx = static_cast<int32_t>(b % Gc), by = static_cast<int32_t>((b / Gc) % Gc);
  const int32_t bz = static_cast<int32_t>(b / (static_cast<int64_t>(Gc) * Gc));
  coarse[b] = vol::BlockOccupied(bitfield, G, bx, by, bz) ? 1 : 0;
}

__global__ void CountKernel(MarchParams pm, const float* __restrict__ origins,
                            const float* __restrict__ directions, const uint8_t* __restrict__ bitfield,
                            const uint8_t* __restrict__ coarse, const float* __restrict__ aabb,
                            int32_t* __restrict__ counts) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= pm.num_rays) return;
  const vol::Box box = vol::MakeBox(aabb, pm.grid_resolution);
  const vol::Ray ray = vol::MakeRay(origins + 3 * r, directions + 3 * r, box);
  CountEmit emit;
  counts[r] = static_cast<int32_t>(vol::MarchRay(ray, box, bitfield, coarse, pm.step_size, pm.max_steps, emit));
}

__global__ void WriteKernel(MarchParams pm, const float* __restrict__ origins,
                            const float* __restrict__ directions, const uint8_t* __restrict__ bitfield,
                            const uint8_t* __restrict__ coarse, const float* __restrict__ aabb,
                            const int32_t* __restrict__ offsets,
                            MarchOutputs out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= pm.num_rays) return;
  const int64_t offset = offsets[r], count = out.ray_counts[r];
  if (offset >= pm.max_samples || count == 0) return;
  const vol::Box box = vol::MakeBox(aabb, pm.grid_resolution);
  const vol::Ray ray = vol::MakeRay(origins + 3 * r, directions + 3 * r, box);
  const float* d = directions + 3 * r;
  WriteEmit emit{out, d[0], d[1], d[2], pm.step_size, static_cast<int32_t>(r), offset,
                 offset + count < pm.max_samples ? offset + count : pm.max_samples};
  vol::MarchRay(ray, box, bitfield, coarse, pm.step_size, pm.max_steps, emit);
}

__global__ void PadKernel(MarchParams pm, const int32_t* __restrict__ offsets, MarchOutputs out) {
  const int64_t R = pm.num_rays;
  const int64_t total =
      R > 0 ? static_cast<int64_t>(offsets[R - 1]) + static_cast<int64_t>(out.ray_counts[R - 1]) : 0;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s == 0) *out.num_samples = static_cast<int32_t>(static_cast<uint32_t>(total));
  if (s >= pm.max_samples || s < total) return;
  for (int a = 0; a < 3; ++a) {
    out.positions[3 * s + a] = 0.0f;
    out.directions[3 * s + a] = 0.0f;
  }
  out.ts[s] = 0.0f;
  out.dts[s] = 0.0f;
  out.ray_indices[s] = static_cast<int32_t>(R);
  out.valid[s] = false;
}

unsigned Blocks(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

size_t CoarseBytes(int32_t G) {
  const size_t Gc = static_cast<size_t>((G + vol::kBlockCells - 1) >> vol::kBlockShift);
  return AlignUp(Gc * Gc * Gc);
}

}  // namespace

// Scratch layout: offsets [R] int32 | coarse grid [Gc^3] uint8 | cub scan temp.
size_t MarchRaysCudaScratchBytes(int64_t num_rays, int32_t grid_resolution) {
  return AlignUp(static_cast<size_t>(num_rays) * sizeof(int32_t)) + CoarseBytes(grid_resolution) +
         AlignUp(ScanTempBytes(num_rays));
}

cudaError_t MarchRaysCuda(cudaStream_t stream, const MarchParams& pm, const float* origins,
                          const float* directions, const uint8_t* bitfield, const float* aabb,
                          const MarchOutputs& out, void* scratch, size_t scratch_bytes) {
  const int64_t R = pm.num_rays, S = pm.max_samples;
  const int32_t G = pm.grid_resolution;
  const size_t offsets_bytes = AlignUp(static_cast<size_t>(R) * sizeof(int32_t));
  int32_t* offsets = static_cast<int32_t*>(scratch);
  uint8_t* coarse = static_cast<uint8_t*>(scratch) + offsets_bytes;
  if (R > 0) {
    const int64_t Gc = (G + vol::kBlockCells - 1) >> vol::kBlockShift;
    CoarseKernel<<<Blocks(Gc * Gc * Gc), kThreads, 0, stream>>>(bitfield, G, coarse);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    CountKernel<<<Blocks(R), kThreads, 0, stream>>>(pm, origins, directions, bitfield, coarse, aabb,
                                                     out.ray_counts);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    size_t temp_bytes = scratch_bytes - offsets_bytes - CoarseBytes(G);
    void* temp = static_cast<char*>(scratch) + offsets_bytes + CoarseBytes(G);
    if (cudaError_t e = cub::DeviceScan::ExclusiveSum(temp, temp_bytes, out.ray_counts, offsets,
                                                      static_cast<int>(R), stream);
        e != cudaSuccess)
      return e;
    WriteKernel<<<Blocks(R), kThreads, 0, stream>>>(pm, origins, directions, bitfield, coarse, aabb,
                                                     offsets, out);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  PadKernel<<<Blocks(S > 0 ? S : 1), kThreads, 0, stream>>>(pm, offsets, out);
  return cudaGetLastError();
}

}  // namespace ngp_kernels
