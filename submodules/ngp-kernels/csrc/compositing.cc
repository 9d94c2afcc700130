// CPU core of compositing (see compositing.h for the semantics and the gradient).
#include "compositing.h"
#include "thread_pool.h"

#include <algorithm>
#include <cstring>

namespace ngp_kernels {
namespace {

constexpr int64_t kSamplesPerTask = 8192;

// Calls segment(begin, end) for every segment whose first sample lies in the task's range of
// samples and whose ray index is in [0, R); other_slot(i) for every sample of the range whose ray
// index is out of range (padding). Slots inside the range that continue a segment started in an
// earlier range belong to that range's task.
template <class Segment, class Other>
void ForEachOwnedSegment(const CompositeInputs& in, int64_t task, Segment&& segment,
                         Other&& other_slot) {
  const int64_t S = in.num_samples;
  const int64_t begin = task * kSamplesPerTask, end = std::min(S, begin + kSamplesPerTask);
  int64_t i = begin;
  while (i < end) {
    const int32_t r = in.ray_indices[i];
    if (!vol::RayInRange(r, in.num_rays)) {
      other_slot(i);
      ++i;
    } else if (vol::SegmentStart(in.ray_indices, i)) {
      const int64_t seg_end = vol::SegmentEnd(in.ray_indices, i, S);
      segment(i, seg_end);
      i = seg_end;
    } else {
      ++i;
    }
  }
}

int64_t NumTasks(int64_t S) { return (S + kSamplesPerTask - 1) / kSamplesPerTask; }

}  // namespace

void CompositeForwardCpu(const CompositeInputs& in, float* colour, float* opacity, float* depth) {
  const int64_t R = in.num_rays;
  std::memset(colour, 0, 3 * R * sizeof(float));
  std::memset(opacity, 0, R * sizeof(float));
  std::memset(depth, 0, R * sizeof(float));
  ParallelFor(NumTasks(in.num_samples), [&](int64_t task) {
    ForEachOwnedSegment(
        in, task,
        [&](int64_t b, int64_t e) { vol::CompositeSegment(in, b, e, colour, opacity, depth); },
        [](int64_t) {});
  });
}

void CompositeBackwardCpu(const CompositeInputs& in, const float* d_colour, const float* d_opacity,
                          const float* d_depth, float* d_sigmas, float* d_rgbs) {
  ParallelFor(NumTasks(in.num_samples), [&](int64_t task) {
    ForEachOwnedSegment(
        in, task,
        [&](int64_t b, int64_t e) {
          vol::CompositeSegmentBackward(in, b, e, d_colour, d_opacity, d_depth, d_sigmas, d_rgbs);
        },
        [&](int64_t i) {
          d_sigmas[i] = 0.0f;
          d_rgbs[3 * i + 0] = 0.0f;
          d_rgbs[3 * i + 1] = 0.0f;
          d_rgbs[3 * i + 2] = 0.0f;
        });
  });
}

}  // namespace ngp_kernels
