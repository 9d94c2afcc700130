// CPU core of ray marching (see marching.h for the semantics) and the volume kernels' thread pool.
#include "marching.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "thread_pool.h"

namespace ngp_kernels {
namespace {


constexpr int64_t kRaysPerTask = 32;
constexpr int64_t kSlotsPerTask = 16384;

struct CountEmit {
  NGP_VOL_HD bool operator()(const vol::Candidate&) const { return true; }
};

struct WriteEmit {
  const MarchOutputs* out;
  const float* d;
  float dt;
  int32_t ray;
  int64_t slot, end;  // next slot, budget
  bool operator()(const vol::Candidate& c) {
    if (slot >= end) return false;
    for (int a = 0; a < 3; ++a) {
      out->positions[3 * slot + a] = c.p[a];
      out->directions[3 * slot + a] = d[a];
    }
    out->ts[slot] = c.t;
    out->dts[slot] = dt;
    out->ray_indices[slot] = ray;
    out->valid[slot] = true;
    ++slot;
    return slot < end;
  }
};

}  // namespace

void MarchRaysCpu(const MarchParams& pm, const float* origins, const float* directions,
                  const uint8_t* bitfield, const float* aabb, const MarchOutputs& out) {
  const int64_t R = pm.num_rays, S = pm.max_samples;
  const vol::Box box = vol::MakeBox(aabb, pm.grid_resolution);
  const int64_t ray_tasks = (R + kRaysPerTask - 1) / kRaysPerTask;

  // 0. Coarse grid: one byte per block of 8^3 cells, "any cell occupied".
  const int32_t Gc = box.coarse_G;
  std::vector<uint8_t> coarse_grid(static_cast<size_t>(Gc) * Gc * Gc);
  uint8_t* coarse = coarse_grid.data();
  ParallelFor(R > 0 ? Gc : 0, [&](int64_t bz) {
    vol::BuildCoarseSlab(bitfield, pm.grid_resolution, static_cast<int32_t>(bz), coarse);
  });

  // 1. Count pass.
  ParallelFor(ray_tasks, [&](int64_t task) {
    const int64_t r1 = std::min(R, (task + 1) * kRaysPerTask);
    CountEmit emit;
    for (int64_t r = task * kRaysPerTask; r < r1; ++r) {
      const vol::Ray ray = vol::MakeRay(origins + 3 * r, directions + 3 * r, box);
      out.ray_counts[r] = static_cast<int32_t>(
          vol::MarchRay(ray, box, bitfield, coarse, pm.step_size, pm.max_steps, emit));
    }
  });

  // 2. Exclusive scan over rays (int32 wrap-around as the twin's int32 cumsum; sums are kept in
  // 64 bits here so that slot arithmetic never overflows).
  std::vector<int64_t> offsets(static_cast<size_t>(R));
  int64_t total = 0;
  for (int64_t r = 0; r < R; ++r) {
    offsets[r] = total;
    total += out.ray_counts[r];
  }
  *out.num_samples = static_cast<int32_t>(static_cast<uint32_t>(total));
  const int64_t used = std::min(total, S);

  // 3. Write pass: only rays that start inside the budget.
  ParallelFor(ray_tasks, [&](int64_t task) {
    const int64_t r1 = std::min(R, (task + 1) * kRaysPerTask);
    for (int64_t r = task * kRaysPerTask; r < r1; ++r) {
      if (offsets[r] >= S || out.ray_counts[r] == 0) continue;
      const vol::Ray ray = vol::MakeRay(origins + 3 * r, directions + 3 * r, box);
      WriteEmit emit{&out, directions + 3 * r, pm.step_size, static_cast<int32_t>(r), offsets[r],
                     std::min(S, offsets[r] + out.ray_counts[r])};
      vol::MarchRay(ray, box, bitfield, coarse, pm.step_size, pm.max_steps, emit);
    }
  });

  // 4. Unused slots.
  const int64_t pad = S - used;
  const int64_t pad_tasks = (pad + kSlotsPerTask - 1) / kSlotsPerTask;
  const int32_t fill_index = static_cast<int32_t>(R);
  ParallelFor(pad_tasks, [&](int64_t task) {
    const int64_t s0 = used + task * kSlotsPerTask, s1 = std::min(S, s0 + kSlotsPerTask);
    const size_t n = static_cast<size_t>(s1 - s0);
    std::memset(out.positions + 3 * s0, 0, 3 * n * sizeof(float));
    std::memset(out.directions + 3 * s0, 0, 3 * n * sizeof(float));
    std::memset(out.ts + s0, 0, n * sizeof(float));
    std::memset(out.dts + s0, 0, n * sizeof(float));
    std::memset(out.valid + s0, 0, n * sizeof(bool));
    std::fill(out.ray_indices + s0, out.ray_indices + s1, fill_index);
  });
}

}  // namespace ngp_kernels
