// The CPU kernels' thread pool: one per process, shared by all ops.
#pragma once

#include <cstdint>
#include <functional>

namespace ngp_kernels {

// Number of worker threads the CPU kernels partition over (caller included). Fixed per process:
// NGP_KERNELS_NUM_THREADS if set, else the CPUs available to this process.
int CpuNumThreads();

// Calls fn(t) for every t in [0, num_tasks) on the calling thread plus CpuNumThreads() - 1
// persistent workers claiming tasks from an atomic counter. Which thread runs a task never
// changes a result as long as every task writes its own outputs. One ParallelFor runs at a time
// (concurrent XLA calls take turns, each with all threads).
void ParallelFor(int64_t num_tasks, const std::function<void(int64_t)>& fn);

}  // namespace ngp_kernels
