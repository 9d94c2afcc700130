// Shared, XLA-free description of a hash grid and of the field (batch) axis.
//
// Used by the CPU core (hash_grid.cc), the CUDA core (hash_grid.cu) and the FFI glue (ffi.cc).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define NGP_HD __host__ __device__ __forceinline__
#else
#define NGP_HD inline
#endif

namespace ngp_kernels {

inline constexpr int kMaxLevels = 64;     // levels per grid
inline constexpr int kMaxFieldRank = 8;   // leading (field / vmap) dims
inline constexpr uint32_t kPrime1 = 2654435761u;
inline constexpr uint32_t kPrime2 = 805459861u;

// One resolution level, precomputed from the Python layout.
struct Level {
  float scale;          // x * scale + 0.5 is the grid position
  uint32_t stride[3];   // dense strides resolution**dim, clamped to 2**32-1 (as the reference)
  uint32_t size;        // rows owned by this level
  uint32_t mask;        // size - 1 when size is a power of two
  int32_t pow2;         // size is a power of two -> modulo is a mask
  int32_t dense;        // dense (1) or hashed (0) indexing
  int64_t offset;       // first row of the level in the flat table
};

// Static grid description (host memory).
struct Grid {
  int num_dims = 0;        // D in {2, 3}
  int num_levels = 0;      // L
  int features = 0;        // F
  int64_t num_entries = 0; // E = rows of the flat table
  Level levels[kMaxLevels];
};

// Maps the flattened output field index n in [0, N) to the field index of each input.
// Leading dims of every input are either equal to the output's or 1 (broadcast, stride 0).
struct FieldBroadcast {
  int rank = 0;
  int64_t dims[kMaxFieldRank] = {};
  int64_t stride[3][kMaxFieldRank] = {};  // per input (table, positions, d_out): stride in fields

  NGP_HD int64_t num_fields() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= dims[i];
    return n;
  }
  // Field index of input `which` (0 table, 1 positions, 2 output cotangent) for output field n.
  NGP_HD int64_t input_field(int which, int64_t n) const {
    int64_t idx = 0;
    for (int i = rank - 1; i >= 0; --i) {
      const int64_t d = dims[i];
      idx += (n % d) * stride[which][i];
      n /= d;
    }
    return idx;
  }
};

}  // namespace ngp_kernels
