// CPU core of ray marching (see marching.h for the semantics) and the volume kernels' thread pool.
#include "marching.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "hash_grid.h"  // CpuNumThreads()

namespace ngp_kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// A small persistent thread pool, the same design as the hash-grid one (hash_grid.cc): Run calls
// fn(t) for every t in [0, num_tasks) on the calling thread plus (size - 1) workers claiming tasks
// from an atomic counter; one Run at a time. Every task writes its own outputs, so which thread
// runs a task never changes a result.
class Pool {
 public:
  explicit Pool(int size) : size_(std::max(1, size)) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { Loop(); });
  }

  void Run(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    if (num_tasks <= 0) return;
    if (size_ == 1 || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    std::lock_guard<std::mutex> busy(run_mu_);
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      num_tasks_ = num_tasks;
      next_.store(0, std::memory_order_relaxed);
      active_ = static_cast<int>(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    Work();
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void Work() {
    for (;;) {
      const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
      if (t >= num_tasks_) return;
      (*fn_)(t);
    }
  }

  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
      }
      Work();
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (--active_ == 0) done_.notify_one();
      }
    }
  }

  const int size_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
};

Pool& GetPool() {
  static Pool* pool = new Pool(CpuNumThreads());  // leaked on purpose: no join at exit
  return *pool;
}

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

void VolumeParallelFor(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  GetPool().Run(num_tasks, fn);
}

void MarchRaysCpu(const MarchParams& pm, const float* origins, const float* directions,
                  const uint8_t* bitfield, const float* aabb, const MarchOutputs& out) {
  const int64_t R = pm.num_rays, S = pm.max_samples;
  const vol::Box box = vol::MakeBox(aabb, pm.grid_resolution);
  const int64_t ray_tasks = (R + kRaysPerTask - 1) / kRaysPerTask;

  // 0. Coarse grid: one byte per block of 8^3 cells, "any cell occupied".
  const int32_t Gc = box.coarse_G;
  std::vector<uint8_t> coarse_grid(static_cast<size_t>(Gc) * Gc * Gc);
  uint8_t* coarse = coarse_grid.data();
  VolumeParallelFor(R > 0 ? Gc : 0, [&](int64_t bz) {
    vol::BuildCoarseSlab(bitfield, pm.grid_resolution, static_cast<int32_t>(bz), coarse);
  });

  // 1. Count pass.
  VolumeParallelFor(ray_tasks, [&](int64_t task) {
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
  VolumeParallelFor(ray_tasks, [&](int64_t task) {
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
  VolumeParallelFor(pad_tasks, [&](int64_t task) {
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
