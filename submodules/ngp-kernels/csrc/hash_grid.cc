// CPU core of the hash-grid encoding. See hash_grid.h for shapes and the determinism contract.
//
// Layout of the work: points are processed in blocks of kBlock, one level at a time, structure of
// arrays (positions, fractions, corner rows and weights as [corner][point] arrays), so that the
// index arithmetic and the table gathers vectorise over points (AVX-512 gathers with
// -march=native). Table scatters (backward) stay scalar, in a fixed order.
#include "hash_grid.h"

#include <sched.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>  // SSE2 is baseline on x86-64; AVX-512 paths are behind __AVX512F__
#define NGP_X86 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
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

Pool& GetPool() {
  static Pool* pool = new Pool(CpuNumThreads());  // leaked on purpose: no join at exit
  return *pool;
}

// ---------------------------------------------------------------------------------------------
// Per-block kernels.

constexpr int kBlock = 128;           // points per block (SoA scratch stays in L1)
constexpr int64_t kPointChunk = 4096; // points per task for point-parallel passes

template <int D>
struct Block {
  static constexpr int C = 1 << D;
  alignas(64) float pos[D][kBlock];
  alignas(64) float frac[D][kBlock];
  alignas(64) uint32_t cell[D][kBlock];
  alignas(64) int32_t rows[C][kBlock];  // row within the level
  alignas(64) float w[C][kBlock];
};

template <int... Is, typename Fn>
inline void ForEachImpl(std::integer_sequence<int, Is...>, Fn&& fn) {
  (fn(std::integral_constant<int, Is>{}), ...);
}
// Calls fn(std::integral_constant<int, i>) for i in [0, N), unrolled at compile time.
template <int N, typename Fn>
inline void ForEach(Fn&& fn) {
  ForEachImpl(std::make_integer_sequence<int, N>{}, std::forward<Fn>(fn));
}

// x * scale + 0.5 rounded once (fused multiply-add), as XLA's fused CPU and GPU code computes it
// (XLA contracts it into an FMA under jit), so cells and fractions match the jitted reference.
inline float ScaledPosition(float x, float scale) {
#if defined(__FMA__) || defined(__AVX512F__)
  return std::fma(x, scale, 0.5f);
#else
  // No FMA unit assumed: the product of two floats is exact in double, so this rounds once too
  // (up to a double-rounding tie, which needs ~30 specific low bits).
  return static_cast<float>(static_cast<double>(x) * static_cast<double>(scale) + 0.5);
#endif
}

template <int D>
inline void LoadPositions(const float* __restrict pos, int n, Block<D>& b) {
  for (int i = 0; i < n; ++i) {
    ForEach<D>([&](auto d) { b.pos[d][i] = pos[i * D + d]; });
  }
}

// Cell, fraction, corner rows (relative to the level offset) and d-linear weights of n points.
template <int D>
inline void Corners(const Level& lv, int n, Block<D>& b) {
  const float scale = lv.scale;
  ForEach<D>([&](auto d) {
    const float* __restrict p = b.pos[d];
    float* __restrict fr = b.frac[d];
    uint32_t* __restrict ce = b.cell[d];
    for (int i = 0; i < n; ++i) {
      const float s = ScaledPosition(p[i], scale);
      const float fl = std::floor(s);
      fr[i] = s - fl;
      ce[i] = static_cast<uint32_t>(static_cast<int32_t>(fl));
    }
  });
  const uint32_t s1 = lv.stride[1], s2 = lv.stride[2];
  const uint32_t size = lv.size, mask = lv.mask;
  const bool dense = lv.dense != 0, pow2 = lv.pow2 != 0;
  ForEach<Block<D>::C>([&](auto c) {
    constexpr uint32_t b0 = c & 1, b1 = (c >> 1) & 1, b2 = (c >> 2) & 1;
    const uint32_t* __restrict c0 = b.cell[0];
    const uint32_t* __restrict c1 = b.cell[1];
    const uint32_t* __restrict c2 = b.cell[D - 1];
    uint32_t* __restrict idx = reinterpret_cast<uint32_t*>(b.rows[c]);
    if (dense) {
      for (int i = 0; i < n; ++i) {
        uint32_t v = (c0[i] + b0) + (c1[i] + b1) * s1;
        if constexpr (D == 3) v += (c2[i] + b2) * s2;
        idx[i] = v;
      }
    } else {
      for (int i = 0; i < n; ++i) {
        uint32_t v = (c0[i] + b0) ^ ((c1[i] + b1) * kPrime1);
        if constexpr (D == 3) v ^= (c2[i] + b2) * kPrime2;
        idx[i] = v;
      }
    }
    if (pow2) {
      for (int i = 0; i < n; ++i) idx[i] &= mask;
    } else {
      // Points in [0, 1] give idx < 2 * size; anything else takes the exact, slow path.
      uint32_t far = 0;
      const uint32_t twice = 2u * size;  // size < 2**31, checked in MakeGrid
      for (int i = 0; i < n; ++i) far |= static_cast<uint32_t>(idx[i] >= twice);
      if (far) {
        for (int i = 0; i < n; ++i) idx[i] %= size;
      } else {
        for (int i = 0; i < n; ++i) idx[i] = idx[i] >= size ? idx[i] - size : idx[i];
      }
    }
    float* __restrict w = b.w[c];
    const float* __restrict f0 = b.frac[0];
    const float* __restrict f1 = b.frac[1];
    const float* __restrict f2 = b.frac[D - 1];
    for (int i = 0; i < n; ++i) {
      // Product over dims, dim 0 first, as the reference's jnp.prod.
      float v = b0 ? f0[i] : 1.0f - f0[i];
      v *= b1 ? f1[i] : 1.0f - f1[i];
      if constexpr (D == 3) v *= b2 ? f2[i] : 1.0f - f2[i];
      w[i] = v;
    }
  });
}

// outT[i][f] = sum_c w[c][i] * table[rows[c][i], f] for one level (table = level base pointer).
template <int D, int kF>
inline void GatherLevel(const float* __restrict table, int features, int n, const Block<D>& b,
                        float* __restrict outT) {
  const int F = kF > 0 ? kF : features;
  int i = 0;
#if defined(__AVX512F__)
  if constexpr (kF == 2) {
    // Eight points at a time: one 64-bit gather fetches both features of a corner row.
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const double* rows64 = reinterpret_cast<const double*>(table);
    for (; i + 8 <= n; i += 8) {
      __m512 acc = _mm512_setzero_ps();
      ForEach<Block<D>::C>([&](auto c) {
        const __m256i r = _mm256_load_si256(reinterpret_cast<const __m256i*>(b.rows[c] + i));
        const __m512 t = _mm512_castpd_ps(_mm512_i32gather_pd(r, rows64, 8));
        const __m512 w = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_load_ps(b.w[c] + i)));
        acc = _mm512_add_ps(acc, _mm512_mul_ps(w, t));  // same order as the scalar loop
      });
      _mm512_storeu_ps(outT + 2 * i, acc);
    }
  }
#endif
  for (; i < n; ++i) {
    for (int f = 0; f < F; ++f) {
      float acc = 0.0f;
      ForEach<Block<D>::C>([&](auto c) { acc += b.w[c][i] * table[b.rows[c][i] * F + f]; });
      outT[i * F + f] = acc;
    }
  }
}

// Prefetches the corner rows of a level whose table slice is too big for the caches to hold
// anyway, so the gathers / scatters that follow find them in L1/L2.
template <int D>
inline void PrefetchRows(const Level& lv, const float* table, int features, int n, const Block<D>& b) {
  if (static_cast<int64_t>(lv.size) * features * 4 < (256 << 10)) return;
  ForEach<Block<D>::C>([&](auto c) {
    for (int i = 0; i < n; ++i)
      __builtin_prefetch(table + static_cast<int64_t>(b.rows[c][i]) * features, 0, 3);
  });
}

// d_table[rows[c][i], f] += w[c][i] * gT[f][i], points in order, corners in order.
template <int D, int kF>
inline void ScatterLevel(float* __restrict d_table, int features, int n, const Block<D>& b,
                         const float* __restrict gT) {
  const int F = kF > 0 ? kF : features;
#if defined(NGP_X86)
  if constexpr (kF == 2) {
    // Both features of a row in one 64-bit read-modify-write (same mul-then-add per element).
    for (int i = 0; i < n; ++i) {
      const __m128 g = _mm_unpacklo_ps(_mm_load_ss(gT + i), _mm_load_ss(gT + kBlock + i));
      ForEach<Block<D>::C>([&](auto c) {
        double* dst = reinterpret_cast<double*>(d_table + static_cast<int64_t>(b.rows[c][i]) * 2);
        __m128 v = _mm_castpd_ps(_mm_load_sd(dst));
        v = _mm_add_ps(v, _mm_mul_ps(_mm_set1_ps(b.w[c][i]), g));
        _mm_store_sd(dst, _mm_castps_pd(v));
      });
    }
    return;
  }
#endif
  for (int i = 0; i < n; ++i) {
    ForEach<Block<D>::C>([&](auto c) {
      float* dst = d_table + static_cast<int64_t>(b.rows[c][i]) * F;
      const float wc = b.w[c][i];
      for (int f = 0; f < F; ++f) dst[f] += wc * gT[f * kBlock + i];
    });
  }
}

// dposT[d][i] += scale * sum_c (sum_f gT[f][i] * table[rows[c][i], f]) * d w_c / d frac_d.
template <int D, int kF>
inline void PositionGradLevel(const float* __restrict table, int features, float scale, int n,
                              const Block<D>& b, const float* __restrict gT,
                              float* __restrict dposT) {
  const int F = kF > 0 ? kF : features;
  constexpr int C = Block<D>::C;
  for (int i = 0; i < n; ++i) {
    float val[C];
    ForEach<C>([&](auto c) {
      float v = 0.0f;
      for (int f = 0; f < F; ++f) v += gT[f * kBlock + i] * table[b.rows[c][i] * F + f];
      val[c] = v;
    });
    ForEach<D>([&](auto d) {
      float s = 0.0f;
      ForEach<C>([&](auto c) {
        float p = ((c >> d) & 1) ? val[c] : -val[c];
        ForEach<D>([&](auto e) {
          if constexpr (e != d) p *= ((c >> e) & 1) ? b.frac[e][i] : 1.0f - b.frac[e][i];
        });
        s += p;
      });
      dposT[d * kBlock + i] += s * scale;
    });
  }
}

// gT[f][i] = d_out[i, l*F + f] (one level's cotangent, transposed).
inline void LoadLevelCotangent(const float* __restrict d_out, int64_t row_stride, int level,
                               int features, int n, float* __restrict gT) {
  for (int f = 0; f < features; ++f) {
    const float* __restrict src = d_out + level * features + f;
    float* __restrict dst = gT + f * kBlock;
    for (int i = 0; i < n; ++i) dst[i] = src[i * row_stride];
  }
}

template <typename T>
T* ThreadScratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------------
// Passes.

struct Args {
  const Grid* grid;
  const FieldBroadcast* fb;
  int64_t num_points;  // B
  const float* table;
  const float* positions;
  const float* d_out;
  float* out;
  float* d_table;
  float* d_positions;
};

template <int D, int kF>
void ForwardTask(const Args& a, int64_t begin, int64_t end) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int64_t B = a.num_points, E = g.num_entries;
  thread_local std::vector<float> scratch;
  float* outT = ThreadScratch(scratch, static_cast<size_t>(LF) * kBlock);
  Block<D> blk;
  for (int64_t p = begin; p < end;) {
    const int64_t n_field = p / B;
    const int64_t seg_end = std::min(end, (n_field + 1) * B);
    const float* table = a.table + a.fb->input_field(0, n_field) * E * F;
    const float* pos = a.positions + a.fb->input_field(1, n_field) * B * D;
    float* out = a.out + n_field * B * LF;
    for (int64_t b0 = p - n_field * B; b0 < seg_end - n_field * B; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, seg_end - n_field * B - b0));
      LoadPositions<D>(pos + b0 * D, n, blk);
      for (int l = 0; l < L; ++l) {
        const Level& lv = g.levels[l];
        Corners<D>(lv, n, blk);
        PrefetchRows<D>(lv, table + lv.offset * F, F, n, blk);
        GatherLevel<D, kF>(table + lv.offset * F, F, n, blk, outT + l * F * kBlock);
      }
      // outT is [L][kBlock][F]; out rows are [L][F].
      float* __restrict o = out + b0 * LF;
      const int Fc = kF > 0 ? kF : F;
      for (int i = 0; i < n; ++i)
        for (int l = 0; l < L; ++l)
          for (int f = 0; f < Fc; ++f) o[i * LF + l * Fc + f] = outT[(l * kBlock + i) * Fc + f];
    }
    p = seg_end;
  }
}

// d_positions only: point-parallel, levels summed in order per point.
template <int D, int kF>
void PositionGradTask(const Args& a, int64_t begin, int64_t end) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int64_t B = a.num_points, E = g.num_entries;
  thread_local std::vector<float> scratch;
  float* gT = ThreadScratch(scratch, static_cast<size_t>(F + D) * kBlock);
  float* dposT = gT + F * kBlock;
  Block<D> blk;
  for (int64_t p = begin; p < end;) {
    const int64_t n_field = p / B;
    const int64_t seg_end = std::min(end, (n_field + 1) * B);
    const float* table = a.table + a.fb->input_field(0, n_field) * E * F;
    const float* pos = a.positions + a.fb->input_field(1, n_field) * B * D;
    const float* dout = a.d_out + a.fb->input_field(2, n_field) * B * LF;
    float* dpos = a.d_positions + n_field * B * D;
    for (int64_t b0 = p - n_field * B; b0 < seg_end - n_field * B; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, seg_end - n_field * B - b0));
      LoadPositions<D>(pos + b0 * D, n, blk);
      std::fill(dposT, dposT + D * kBlock, 0.0f);
      for (int l = 0; l < L; ++l) {
        const Level& lv = g.levels[l];
        Corners<D>(lv, n, blk);
        PrefetchRows<D>(lv, table + lv.offset * F, F, n, blk);
        LoadLevelCotangent(dout + b0 * LF, LF, l, F, n, gT);
        PositionGradLevel<D, kF>(table + lv.offset * F, F, lv.scale, n, blk, gT, dposT);
      }
      for (int i = 0; i < n; ++i)
        for (int d = 0; d < D; ++d) dpos[(b0 + i) * D + d] = dposT[d * kBlock + i];
    }
    p = seg_end;
  }
}

// Group task: group `group` of `num_groups` owns the units u = n * L + l with u % num_groups ==
// group. It zeroes and accumulates d_table for its units (one writer per table row, points in
// order) and, if partial != null, writes its levels' share of d_positions for every point.
template <int D, int kF>
void TableGradTask(const Args& a, int group, int num_groups, float* partial) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int64_t B = a.num_points, E = g.num_entries;
  const int64_t N = a.fb->num_fields();
  thread_local std::vector<float> scratch;
  float* gT = ThreadScratch(scratch, static_cast<size_t>(F + D) * kBlock);
  float* dposT = gT + F * kBlock;
  std::vector<int> levels;
  Block<D> blk;
  for (int64_t n_field = 0; n_field < N; ++n_field) {
    levels.clear();
    for (int l = 0; l < L; ++l)
      if ((n_field * L + l) % num_groups == group) levels.push_back(l);
    if (levels.empty()) {
      if (partial) std::fill(partial + n_field * B * D, partial + (n_field + 1) * B * D, 0.0f);
      continue;
    }
    const float* table = a.table + a.fb->input_field(0, n_field) * E * F;
    const float* pos = a.positions + a.fb->input_field(1, n_field) * B * D;
    const float* dout = a.d_out + a.fb->input_field(2, n_field) * B * LF;
    float* dtab = a.d_table + n_field * E * F;
    for (int l : levels) {
      const Level& lv = g.levels[l];
      std::memset(dtab + lv.offset * F, 0, sizeof(float) * lv.size * F);
    }
    for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, B - b0));
      LoadPositions<D>(pos + b0 * D, n, blk);
      if (partial) std::fill(dposT, dposT + D * kBlock, 0.0f);
      for (int l : levels) {
        const Level& lv = g.levels[l];
        Corners<D>(lv, n, blk);
        PrefetchRows<D>(lv, dtab + lv.offset * F, F, n, blk);
        LoadLevelCotangent(dout + b0 * LF, LF, l, F, n, gT);
        ScatterLevel<D, kF>(dtab + lv.offset * F, F, n, blk, gT);
        if (partial)
          PositionGradLevel<D, kF>(table + lv.offset * F, F, lv.scale, n, blk, gT, dposT);
      }
      if (partial) {
        float* dst = partial + (n_field * B + b0) * D;
        for (int i = 0; i < n; ++i)
          for (int d = 0; d < D; ++d) dst[i * D + d] = dposT[d * kBlock + i];
      }
    }
  }
}

template <int D, int kF>
void Forward(const Args& a) {
  const int64_t total = a.fb->num_fields() * a.num_points;
  const int64_t tasks = (total + kPointChunk - 1) / kPointChunk;
  GetPool().Run(tasks, [&](int64_t t) {
    ForwardTask<D, kF>(a, t * kPointChunk, std::min(total, (t + 1) * kPointChunk));
  });
}

template <int D, int kF>
void Backward(const Args& a) {
  const int64_t N = a.fb->num_fields();
  const int64_t total = N * a.num_points;
  const int64_t chunks = (total + kPointChunk - 1) / kPointChunk;
  Pool& pool = GetPool();
  if (!a.d_table) {
    if (!a.d_positions) return;
    pool.Run(chunks, [&](int64_t t) {
      PositionGradTask<D, kF>(a, t * kPointChunk, std::min(total, (t + 1) * kPointChunk));
    });
    return;
  }
  // Fixed number of groups (independent of scheduling); the result of d_table does not depend on
  // it at all, d_positions (fused case) depends only on it.
  const int64_t units = N * a.grid->num_levels;
  const int num_groups = static_cast<int>(std::min<int64_t>(CpuNumThreads(), units));
  if (!a.d_positions) {
    pool.Run(num_groups, [&](int64_t t) {
      TableGradTask<D, kF>(a, static_cast<int>(t), num_groups, nullptr);
    });
    return;
  }
  // Fused: group 0 writes its partial straight into d_positions, the others into scratch.
  std::unique_ptr<float[]> scratch;
  const int64_t per = total * D;
  if (num_groups > 1) scratch.reset(new float[static_cast<size_t>(per) * (num_groups - 1)]);
  pool.Run(num_groups, [&](int64_t t) {
    float* partial = t == 0 ? a.d_positions : scratch.get() + (t - 1) * per;
    TableGradTask<D, kF>(a, static_cast<int>(t), num_groups, partial);
  });
  if (num_groups > 1) {
    const int64_t chunk = kPointChunk * D;
    pool.Run((per + chunk - 1) / chunk, [&](int64_t t) {
      const int64_t lo = t * chunk, hi = std::min(per, lo + chunk);
      for (int gi = 1; gi < num_groups; ++gi) {
        const float* src = scratch.get() + (gi - 1) * per;
        for (int64_t k = lo; k < hi; ++k) a.d_positions[k] += src[k];
      }
    });
  }
}

template <template <int, int> class Op, int D>
void DispatchF(const Args& a) {
  switch (a.grid->features) {
    case 1: return Op<D, 1>::Run(a);
    case 2: return Op<D, 2>::Run(a);
    case 4: return Op<D, 4>::Run(a);
    case 8: return Op<D, 8>::Run(a);
    default: return Op<D, 0>::Run(a);
  }
}
template <template <int, int> class Op>
void Dispatch(const Args& a) {
  if (a.grid->num_dims == 2) {
    DispatchF<Op, 2>(a);
  } else {
    DispatchF<Op, 3>(a);
  }
}
template <int D, int kF>
struct ForwardOp {
  static void Run(const Args& a) { Forward<D, kF>(a); }
};
template <int D, int kF>
struct BackwardOp {
  static void Run(const Args& a) { Backward<D, kF>(a); }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

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

std::string MakeGrid(int num_dims, int features, int64_t num_entries, int num_levels,
                     const float* scales, const int64_t* resolutions, const int64_t* sizes,
                     const int64_t* offsets, const int32_t* dense, Grid* grid) {
  if (num_dims != 2 && num_dims != 3) return "num_dims must be 2 or 3";
  if (features < 1) return "features_per_level must be >= 1";
  if (num_levels < 1 || num_levels > kMaxLevels)
    return "num_levels must be in [1, " + std::to_string(kMaxLevels) + "]";
  grid->num_dims = num_dims;
  grid->features = features;
  grid->num_levels = num_levels;
  grid->num_entries = num_entries;
  int64_t next = 0;
  for (int l = 0; l < num_levels; ++l) {
    Level& lv = grid->levels[l];
    if (!std::isfinite(scales[l])) return "level scales must be finite";
    if (resolutions[l] < 1) return "level resolutions must be >= 1";
    if (sizes[l] < 1 || sizes[l] * features > INT32_MAX)
      return "level sizes must be >= 1 and size * features < 2**31";
    if (offsets[l] != next) return "levels must tile the table: offset_l = sum of earlier sizes";
    next += sizes[l];
    lv.scale = scales[l];
    uint64_t stride = 1;
    for (int d = 0; d < 3; ++d) {
      lv.stride[d] = static_cast<uint32_t>(std::min<uint64_t>(stride, 0xFFFFFFFFull));
      const uint64_t res = static_cast<uint64_t>(resolutions[l]);
      stride = stride > (1ull << 40) / res ? (1ull << 40) : stride * res;  // saturate
    }
    lv.size = static_cast<uint32_t>(sizes[l]);
    lv.pow2 = (lv.size & (lv.size - 1)) == 0;
    lv.mask = lv.size - 1;
    lv.dense = dense[l] != 0;
    lv.offset = offsets[l];
  }
  if (next != num_entries)
    return "table has " + std::to_string(num_entries) + " rows but the levels need " +
           std::to_string(next);
  return "";
}

void HashGridForwardCpu(const Grid& grid, const FieldBroadcast& fb, int64_t num_points,
                        const float* table, const float* positions, float* out) {
  Args a{&grid, &fb, num_points, table, positions, nullptr, out, nullptr, nullptr};
  Dispatch<ForwardOp>(a);
}

void HashGridBackwardCpu(const Grid& grid, const FieldBroadcast& fb, int64_t num_points,
                         const float* table, const float* positions, const float* d_out,
                         float* d_table, float* d_positions) {
  Args a{&grid, &fb, num_points, table, positions, d_out, nullptr, d_table, d_positions};
  Dispatch<BackwardOp>(a);
}

}  // namespace ngp_kernels
