// One persistent thread pool shared by every CPU kernel of the package.
#include "thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ngp_kernels {
namespace {

// ---------------------------------------------------------------------------------------------
// A small persistent thread pool. Run(num_tasks, fn) calls fn(t) for every t in [0, num_tasks),
// on the calling thread plus (size - 1) workers that claim tasks from an atomic counter. Which
// thread runs a task never changes a result: every task writes its own outputs. A call that finds
// the pool busy (a concurrent XLA thread) waits for it: one Run at a time.
class Pool {
 public:
  explicit Pool(int size) : size_(std::max(1, size)) {
    for (int i = 1; i < size_; ++i) workers_.emplace_back([this] { Loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

  int size() const { return size_; }

  void Run(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
    if (num_tasks <= 0) return;
    if (size_ == 1 || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t);
      return;
    }
    // XLA may run independent custom calls concurrently (e.g. a forward and a backward that does
    // not need its output): they take turns, each with all threads, rather than fight over cores.
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
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
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
  std::mutex run_mu_;  // one Run at a time
  std::mutex mu_;
  std::condition_variable wake_, done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};


}  // namespace

int CpuNumThreads() {
  static const int n = [] {
    if (const char* env = std::getenv("NGP_KERNELS_NUM_THREADS")) {
      const int v = std::atoi(env);
      if (v > 0) return v;
    }
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
      const int c = CPU_COUNT(&set);
      if (c > 0) return c;
    }
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

void ParallelFor(int64_t num_tasks, const std::function<void(int64_t)>& fn) {
  static Pool* pool = new Pool(CpuNumThreads());  // leaked on purpose: no join at exit
  pool->Run(num_tasks, fn);
}

}  // namespace ngp_kernels
