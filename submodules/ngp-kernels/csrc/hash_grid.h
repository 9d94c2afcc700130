// CPU core of the multiresolution hash-grid encoding (Instant-NGP). No XLA types here.
//
// Shapes (all float32, row-major; N = number of output fields, see FieldBroadcast):
//   table      [Nt, E, F]   flat table of all levels, level l owns rows offset_l : offset_l + size_l
//   positions  [Np, B, D]   points in [0, 1]^D
//   out        [N, B, L*F]  level-major features
//   d_out      [Ng, B, L*F] cotangent of out
//   d_table    [N, E, F]    cotangent of table, one per output field
//   d_positions[N, B, D]    cotangent of positions, one per output field
// Nt, Np, Ng broadcast to N through FieldBroadcast (input 0 table, 1 positions, 2 d_out).
#pragma once

#include <cstdint>
#include <string>

#include "grid_common.h"
#include "thread_pool.h"

namespace ngp_kernels {

// Builds a Grid from per-level arrays (host pointers, length num_levels). Returns "" on success,
// else a description of what is wrong.
std::string MakeGrid(int num_dims, int features, int64_t num_entries, int num_levels,
                     const float* scales, const int64_t* resolutions, const int64_t* sizes,
                     const int64_t* offsets, const int32_t* dense, Grid* grid);


// out = encode(table, positions). Points are split among threads; every output written once.
void HashGridForwardCpu(const Grid& grid, const FieldBroadcast& fb, int64_t num_points,
                        const float* table, const float* positions, float* out);

// Backward pass. d_table and/or d_positions may be null (not wanted).
// Deterministic: d_table rows of level l of field n are accumulated by exactly one task that walks
// the points in order; d_positions sums levels in a fixed order (when both are wanted, a fixed
// number of level groups, CpuNumThreads(), produce partial sums that are added in group order).
void HashGridBackwardCpu(const Grid& grid, const FieldBroadcast& fb, int64_t num_points,
                         const float* table, const float* positions, const float* d_out,
                         float* d_table, float* d_positions);

}  // namespace ngp_kernels
