// CUDA core of the hash-grid encoding: launchers on a caller-provided stream. No XLA types here.
// Shapes and broadcasting as in hash_grid.h; all pointers are device pointers, Grid and
// FieldBroadcast are passed by value to the kernels.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "grid_common.h"

namespace ngp_kernels {

// out[N, B, L*F] = encode(table, positions). Returns the launch status.
cudaError_t HashGridForwardCuda(cudaStream_t stream, const Grid& grid, const FieldBroadcast& fb,
                                int64_t num_points, const float* table, const float* positions,
                                float* out);

// d_table [N, E, F] and/or d_positions [N, B, D] (either may be null). d_table is accumulated with
// atomicAdd, so on the GPU its float sums are NOT bitwise deterministic (order of atomics);
// d_positions is (one thread per point, levels in order).
cudaError_t HashGridBackwardCuda(cudaStream_t stream, const Grid& grid, const FieldBroadcast& fb,
                                 int64_t num_points, const float* table, const float* positions,
                                 const float* d_out, float* d_table, float* d_positions);

}  // namespace ngp_kernels
