// Ray marching through an occupancy bitfield with packed output (Instant-NGP). No XLA types here.
//
// Computes exactly the function of the pure-JAX twin `fields.rendering.volume.march_rays` as XLA
// compiles it under `jit` (scene box a compile-time constant, as in training), with the same float
// operations in the same order:
//   safe_a   = |d_a| < 1e-9 ? 1e-9 : d_a;  inv_a = 1 / safe_a
//   t0, t1   = (aabb0 - o) * inv, (aabb1 - o) * inv
//   t_near   = max(max_a min(t0_a, t1_a), 0);  t_far = min_a max(t0_a, t1_a)
//   t_k      = t_near + fl((k + 0.5) * step)            (product rounded, then the sum)
//   p_k      = fma(d, t_k, o)                           (XLA contracts o + d * t into one FMA)
//   unit     = (p - aabb0) * fl(1 / (aabb1 - aabb0))    (XLA turns "/ constant" into "* 1/constant")
//   cell     = clamp(floor((p - aabb0) * fl(fl(1 / ext) * G)), 0, G - 1)   (XLA folds the two
//              constant factors; for a power-of-two G this equals floor(unit * G) bit for bit)
//   kept     = t_k < t_far  and  0 <= unit <= 1 (all axes)  and  bit (i & 7) of byte (i >> 3) of
//              the bitfield, i = x + G * (y + G * z)
// Samples are packed in ray order, front to back, truncated to the budget S; num_samples and
// ray_counts count before truncation; unused slots: zeros, ray_index = R, valid = false, dt = 0.
//
// Empty-space skipping (DDA): every quantity above is a monotone function of k along each axis
// (rounding is monotone), so when candidates k and j > k are both inside the box, before t_far and
// in the same cell (or the same block of 8^3 cells), all candidates between them are too. In an
// empty region (an empty block of a coarse "any occupied" grid built from the bitfield per call,
// else an empty cell) the marcher estimates the last candidate still inside the region, checks it
// with the exact formulas above and jumps past it (halving the jump until the check passes): the
// output is identical to visiting every candidate.
#pragma once

#include <cmath>
#include <cstdint>
#include <functional>

#if defined(__CUDACC__)
#define NGP_VOL_HD __host__ __device__ __forceinline__
#else
#define NGP_VOL_HD inline
#endif

#ifdef NGP_KERNELS_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ngp_kernels {

// Problem size and static attributes of one march_rays call.
struct MarchParams {
  int64_t num_rays = 0;         // R
  int64_t max_steps = 0;        // candidates per ray (M)
  int64_t max_samples = 0;      // sample budget (S)
  int32_t grid_resolution = 0;  // G (cells per axis)
  float step_size = 0.0f;
};

// Outputs of march_rays (host pointers for the CPU core, device pointers for CUDA).
struct MarchOutputs {
  float* positions;     // [S, 3]
  float* directions;    // [S, 3]
  float* ts;            // [S]
  float* dts;           // [S]
  int32_t* ray_indices; // [S]
  bool* valid;          // [S]
  int32_t* num_samples; // []
  int32_t* ray_counts;  // [R]
};

// ---------------------------------------------------------------------------------------------
// Float ops with exactly one rounding each, on host (compiled with -ffp-contract=off) and device
// (nvcc contracts a * b + c into an FMA unless told otherwise, hence the _rn intrinsics).
namespace vol {

#if defined(__CUDA_ARCH__)
__device__ __forceinline__ float Add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float Sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float Mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float Div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float Fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ float Exp(float x) { return expf(x); }
#else
inline float Add(float a, float b) { return a + b; }
inline float Sub(float a, float b) { return a - b; }
inline float Mul(float a, float b) { return a * b; }
inline float Div(float a, float b) { return a / b; }
inline float Fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float Exp(float x) { return std::exp(x); }
#endif

NGP_VOL_HD float Min(float a, float b) { return b < a ? b : a; }
NGP_VOL_HD float Max(float a, float b) { return b > a ? b : a; }

// The scene box and the grid, derived once per ray from the aabb buffer.
struct Box {
  float lo[3];
  float inv_extent[3];  // fl(1 / (hi - lo))
  float cell_scale[3];  // fl(inv_extent * G)
  float cell_size[3];   // (hi - lo) / G, for the skip estimate only
  float hi[3];
  int32_t G;
  int32_t coarse_G;  // blocks per axis of the coarse grid, ceil(G / kBlockCells)
};

inline constexpr int32_t kBlockShift = 3;  // coarse blocks of 8^3 cells
inline constexpr int32_t kBlockCells = 1 << kBlockShift;

NGP_VOL_HD Box MakeBox(const float* aabb, int32_t G) {
  Box b;
  for (int a = 0; a < 3; ++a) {
    b.lo[a] = aabb[a];
    b.hi[a] = aabb[3 + a];
    const float extent = Sub(b.hi[a], b.lo[a]);
    b.inv_extent[a] = Div(1.0f, extent);
    b.cell_scale[a] = Mul(b.inv_extent[a], static_cast<float>(G));
    b.cell_size[a] = Div(extent, static_cast<float>(G));
  }
  b.G = G;
  b.coarse_G = (G + kBlockCells - 1) >> kBlockShift;
  return b;
}

// One candidate sample: its t, position and cell.
struct Candidate {
  float t;
  float p[3];
  int32_t cell[3];
  bool inside;  // 0 <= unit <= 1 on all axes
};

struct Ray {
  float o[3], d[3];
  float inv_d[3];  // 1 / d (0 where d = 0), for the skip estimate only
  float t_near, t_far;
};

NGP_VOL_HD Ray MakeRay(const float* o, const float* d, const Box& box) {
  Ray r;
  float t_near = 0.0f, t_far = 0.0f;
  for (int a = 0; a < 3; ++a) {
    r.o[a] = o[a];
    r.d[a] = d[a];
    r.inv_d[a] = d[a] != 0.0f ? 1.0f / d[a] : 0.0f;
    const float safe = fabsf(d[a]) < 1e-9f ? 1e-9f : d[a];
    const float inv = Div(1.0f, safe);
    const float t0 = Mul(Sub(box.lo[a], o[a]), inv);
    const float t1 = Mul(Sub(box.hi[a], o[a]), inv);
    const float lo = Min(t0, t1), hi = Max(t0, t1);
    t_near = a == 0 ? lo : Max(t_near, lo);
    t_far = a == 0 ? hi : Min(t_far, hi);
  }
  r.t_near = Max(t_near, 0.0f);
  r.t_far = t_far;
  return r;
}

NGP_VOL_HD float CandidateT(const Ray& r, int64_t k, float step) {
  return Add(r.t_near, Mul(Add(static_cast<float>(k), 0.5f), step));
}

NGP_VOL_HD Candidate Evaluate(const Ray& r, const Box& box, float t) {
  Candidate c;
  c.t = t;
  c.inside = true;
  for (int a = 0; a < 3; ++a) {
    c.p[a] = Fma(r.d[a], t, r.o[a]);
    const float rel = Sub(c.p[a], box.lo[a]);
    const float unit = Mul(rel, box.inv_extent[a]);
    c.inside = c.inside && unit >= 0.0f && unit <= 1.0f;
    const float s = floorf(Mul(rel, box.cell_scale[a]));
    // Clamp in float first (keeps the int conversion defined for any value, NaN -> 0).
    const float hi = static_cast<float>(box.G - 1);
    c.cell[a] = static_cast<int32_t>(s >= 0.0f ? (s <= hi ? s : hi) : 0.0f);
  }
  return c;
}

NGP_VOL_HD bool Occupied(const uint8_t* bitfield, const Candidate& c, int32_t G) {
  if (!c.inside) return false;
  const int64_t i = c.cell[0] + static_cast<int64_t>(G) * (c.cell[1] + static_cast<int64_t>(G) * c.cell[2]);
  return (bitfield[i >> 3] >> (i & 7)) & 1;
}

NGP_VOL_HD int64_t BlockIndex(const Candidate& c, int32_t coarse_G) {
  return (c.cell[0] >> kBlockShift) +
         static_cast<int64_t>(coarse_G) *
             ((c.cell[1] >> kBlockShift) + static_cast<int64_t>(coarse_G) * (c.cell[2] >> kBlockShift));
}

// True when any cell of block (bx, by, bz) (cells kBlockCells * b_a + [0, kBlockCells) per axis,
// clipped to the grid) is occupied.
NGP_VOL_HD bool BlockOccupied(const uint8_t* bitfield, int32_t G, int32_t bx, int32_t by, int32_t bz) {
  const int32_t x0 = bx * kBlockCells, x1 = x0 + kBlockCells < G ? x0 + kBlockCells : G;
  const int32_t y1 = (by + 1) * kBlockCells < G ? (by + 1) * kBlockCells : G;
  const int32_t z1 = (bz + 1) * kBlockCells < G ? (bz + 1) * kBlockCells : G;
  for (int32_t z = bz * kBlockCells; z < z1; ++z) {
    for (int32_t y = by * kBlockCells; y < y1; ++y) {
      const int64_t row = static_cast<int64_t>(G) * (y + static_cast<int64_t>(G) * z);
      if ((G & (kBlockCells - 1)) == 0) {  // a block row is one whole byte
        if (bitfield[(row + x0) >> 3] != 0) return true;
      } else {
        for (int32_t x = x0; x < x1; ++x)
          if ((bitfield[(row + x) >> 3] >> ((row + x) & 7)) & 1) return true;
      }
    }
  }
  return false;
}

// The coarse grid: coarse[bx + Gc * (by + Gc * bz)] = BlockOccupied(...). Fills the blocks of one
// z slab bz (one task of the build).
NGP_VOL_HD void BuildCoarseSlab(const uint8_t* bitfield, int32_t G, int32_t bz, uint8_t* coarse) {
  const int32_t Gc = (G + kBlockCells - 1) >> kBlockShift;
  for (int32_t by = 0; by < Gc; ++by)
    for (int32_t bx = 0; bx < Gc; ++bx)
      coarse[bx + static_cast<int64_t>(Gc) * (by + static_cast<int64_t>(Gc) * bz)] =
          BlockOccupied(bitfield, G, bx, by, bz) ? 1 : 0;
}

// Marches one ray, calling emit(candidate) for every kept sample front to back (emit returns false
// to stop early). `coarse` is the block grid of BuildCoarseSlab. Returns the number of samples
// emitted.
template <class Emit>
NGP_VOL_HD int64_t MarchRay(const Ray& r, const Box& box, const uint8_t* bitfield,
                            const uint8_t* coarse, float step, int64_t max_steps, Emit& emit) {
  int64_t count = 0;
  int64_t k = 0;
  const float inv_step = 1.0f / step;  // estimate only
  while (k < max_steps) {
    const float t = CandidateT(r, k, step);
    if (!(t < r.t_far)) break;  // t is non-decreasing in k
    const Candidate c = Evaluate(r, box, t);
    if (Occupied(bitfield, c, box.G)) {
      ++count;
      if (!emit(c)) return count;
      ++k;
      continue;
    }
    if (!c.inside) {  // only at the rounding edges of the box
      ++k;
      continue;
    }
    // Empty region (the cell's block when the whole block is empty, else the cell): estimate t
    // where the ray leaves it (the nearest far face), then the last candidate before that; verify
    // it exactly, on failure try the candidate before, then halve the jump.
    const int64_t block = BlockIndex(c, box.coarse_G);
    const bool block_empty = coarse[block] == 0;
    float t_exit = INFINITY;
    for (int a = 0; a < 3; ++a) {
      if (r.d[a] == 0.0f) continue;
      int32_t face;
      if (block_empty) {
        face = ((c.cell[a] >> kBlockShift) + (r.d[a] > 0.0f ? 1 : 0)) << kBlockShift;
      } else {
        face = c.cell[a] + (r.d[a] > 0.0f ? 1 : 0);
      }
      const float boundary = box.lo[a] + static_cast<float>(face) * box.cell_size[a];
      t_exit = Min(t_exit, t + (boundary - c.p[a]) * r.inv_d[a]);
    }
    const float steps_f = (t_exit - r.t_near) * inv_step - 0.501f;
    int64_t guess;
    if (!(steps_f < static_cast<float>(max_steps))) {
      guess = max_steps - 1;
    } else if (!(steps_f > static_cast<float>(k))) {
      guess = k;
    } else {
      guess = static_cast<int64_t>(steps_f);
    }
    bool jumped = false;
    bool first_try = true;
    while (guess > k) {
      const float tg = CandidateT(r, guess, step);
      if (tg < r.t_far) {
        const Candidate g = Evaluate(r, box, tg);
        const bool same = block_empty ? BlockIndex(g, box.coarse_G) == block
                                      : (g.cell[0] == c.cell[0] && g.cell[1] == c.cell[1] &&
                                         g.cell[2] == c.cell[2]);
        if (g.inside && same) {
          k = guess + 1;
          jumped = true;
          break;
        }
      }
      guess = first_try ? guess - 1 : k + (guess - k) / 2;
      first_try = false;
    }
    if (!jumped) ++k;
  }
  return count;
}

}  // namespace vol


// CPU: coarse grid (parallel over z slabs), count pass per ray (parallel), exclusive scan over
// rays, write pass (parallel), padding.
// Deterministic (every output element is written once, by a function of the inputs only).
void MarchRaysCpu(const MarchParams& params, const float* origins, const float* directions,
                  const uint8_t* bitfield, const float* aabb, const MarchOutputs& out);

#ifdef NGP_KERNELS_WITH_CUDA
// Number of bytes of device scratch MarchRaysCuda needs (offsets, scan temp, coarse grid).
size_t MarchRaysCudaScratchBytes(int64_t num_rays, int32_t grid_resolution);

// CUDA: same passes as the CPU (coarse-grid kernel, count kernel, cub exclusive scan, write
// kernel, padding kernel), enqueued on `stream`; `scratch` is MarchRaysCudaScratchBytes(...)
// bytes of device memory.
cudaError_t MarchRaysCuda(cudaStream_t stream, const MarchParams& params, const float* origins,
                          const float* directions, const uint8_t* bitfield, const float* aabb,
                          const MarchOutputs& out, void* scratch, size_t scratch_bytes);
#endif

}  // namespace ngp_kernels
