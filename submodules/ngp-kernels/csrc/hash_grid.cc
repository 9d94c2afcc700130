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
// Per-block kernels.

constexpr int kBlock = 128;            // points per block (SoA scratch stays in L1)
constexpr int64_t kPointChunk = 4096;  // points per task of a point-parallel pass
constexpr int kPrefetchAhead = 16;     // points between a row's prefetch and its gather / scatter
// Rows of levels whose slice of the table is at least this big are prefetched ahead of use: such
// a slice does not stay in L1/L2, and a random row costs an L2/L3 round trip.
constexpr int64_t kPrefetchBytes = 256 << 10;

inline bool PrefetchLevel(const Level& lv, int features) {
  return static_cast<int64_t>(lv.size) * features * 4 >= kPrefetchBytes;
}

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

// Prefetch of one row into L1 (kWrite: for a read-modify-write). Inline asm on x86: GCC's
// vectoriser deletes __builtin_prefetch calls from the loops it vectorises (all of them here).
template <bool kWrite>
inline void PrefetchRow(const float* p) {
#if defined(NGP_X86) && defined(__GNUC__)
  if constexpr (kWrite) {
    asm volatile("prefetchw %0" : : "m"(*p));  // a no-op on x86 CPUs without PREFETCHW
  } else {
    asm volatile("prefetcht0 %0" : : "m"(*p));
  }
#else
  __builtin_prefetch(p, kWrite ? 1 : 0, 3);
#endif
}

// Prefetches the corner rows of points [lo, hi) of the block (kWrite: for a read-modify-write).
template <int D, bool kWrite>
inline void PrefetchPoints(const float* table, int features, const Block<D>& b, int lo, int hi) {
  for (int i = lo; i < hi; ++i) {
    ForEach<Block<D>::C>([&](auto c) {
      PrefetchRow<kWrite>(table + static_cast<int64_t>(b.rows[c][i]) * features);
    });
  }
}

// outT[i][f] = sum_c w[c][i] * table[rows[c][i], f] for one level (table = level base pointer).
// pf: prefetch rows kPrefetchAhead points ahead of the gathers.
template <int D, int kF>
inline void GatherLevel(const float* __restrict table, int features, int n, const Block<D>& b,
                        float* __restrict outT, bool pf) {
  const int F = kF > 0 ? kF : features;
  int i = 0;
#if defined(__AVX512F__)
  if constexpr (kF == 2) {
    // No software prefetch here: the eight independent gathers keep enough loads in flight, and
    // the extra prefetch instructions measured slower.
    pf = false;
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
  if (pf) PrefetchPoints<D, false>(table, F, b, i, std::min(n, i + kPrefetchAhead));
  for (; i < n; ++i) {
    if (pf && i + kPrefetchAhead < n)
      PrefetchPoints<D, false>(table, F, b, i + kPrefetchAhead, i + kPrefetchAhead + 1);
    for (int f = 0; f < F; ++f) {
      float acc = 0.0f;
      ForEach<Block<D>::C>([&](auto c) { acc += b.w[c][i] * table[b.rows[c][i] * F + f]; });
      outT[i * F + f] = acc;
    }
  }
}

// d_table[rows[c][i], f] += w[c][i] * g[i][f], points in order, corners in order (g: the level's
// cotangent, point-major, as in d_out). pf: prefetch rows kPrefetchAhead points ahead.
template <int D, int kF>
inline void ScatterLevel(float* __restrict d_table, int features, int n, const Block<D>& b,
                         const float* __restrict g, bool pf) {
  const int F = kF > 0 ? kF : features;
  constexpr int C = Block<D>::C;
  if (pf) PrefetchPoints<D, true>(d_table, F, b, 0, std::min(n, kPrefetchAhead));
#if defined(NGP_X86)
  if constexpr (kF == 2) {
    // The products w * g first (vectorised, the same single-rounding multiply as before), then one
    // 64-bit read-modify-write per corner row carrying both features.
    alignas(64) float wg[C][2 * kBlock];
    int i0 = 0;
#if defined(__AVX512F__)
    const __m512i dup = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    for (; i0 + 8 <= n; i0 += 8) {
      const __m512 gv = _mm512_loadu_ps(g + 2 * i0);
      ForEach<C>([&](auto c) {
        const __m512 w = _mm512_permutexvar_ps(dup, _mm512_castps256_ps512(_mm256_load_ps(b.w[c] + i0)));
        _mm512_store_ps(wg[c] + 2 * i0, _mm512_mul_ps(w, gv));
      });
    }
#endif
    for (; i0 < n; ++i0) {
      ForEach<C>([&](auto c) {
        wg[c][2 * i0] = b.w[c][i0] * g[2 * i0];
        wg[c][2 * i0 + 1] = b.w[c][i0] * g[2 * i0 + 1];
      });
    }
    for (int i = 0; i < n; ++i) {
      if (pf && i + kPrefetchAhead < n)
        PrefetchPoints<D, true>(d_table, F, b, i + kPrefetchAhead, i + kPrefetchAhead + 1);
      ForEach<C>([&](auto c) {
        // 64-bit loads / stores through the may-alias __m64_u type of _mm_loadl_epi64 (a plain
        // double* access to float memory would let the compiler reorder it, strict aliasing).
        __m128i* dst = reinterpret_cast<__m128i*>(d_table + static_cast<int64_t>(b.rows[c][i]) * 2);
        const __m128 p = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg[c] + 2 * i)));
        const __m128 v = _mm_add_ps(_mm_castsi128_ps(_mm_loadl_epi64(dst)), p);
        _mm_storel_epi64(dst, _mm_castps_si128(v));
      });
    }
    return;
  }
#endif
  for (int i = 0; i < n; ++i) {
    if (pf && i + kPrefetchAhead < n)
      PrefetchPoints<D, true>(d_table, F, b, i + kPrefetchAhead, i + kPrefetchAhead + 1);
    ForEach<C>([&](auto c) {
      float* dst = d_table + static_cast<int64_t>(b.rows[c][i]) * F;
      const float wc = b.w[c][i];
      for (int f = 0; f < F; ++f) dst[f] += wc * g[i * F + f];
    });
  }
}

// dpos[i][d] += scale * sum_c (sum_f g[i][f] * table[rows[c][i], f]) * d w_c / d frac_d.
template <int D, int kF>
inline void PositionGradLevel(const float* __restrict table, int features, float scale, int n,
                              const Block<D>& b, const float* __restrict g,
                              float* __restrict dpos, bool pf) {
  const int F = kF > 0 ? kF : features;
  constexpr int C = Block<D>::C;
  if (pf) PrefetchPoints<D, false>(table, F, b, 0, std::min(n, kPrefetchAhead));
  for (int i = 0; i < n; ++i) {
    if (pf && i + kPrefetchAhead < n)
      PrefetchPoints<D, false>(table, F, b, i + kPrefetchAhead, i + kPrefetchAhead + 1);
    float val[C];
    ForEach<C>([&](auto c) {
      float v = 0.0f;
      for (int f = 0; f < F; ++f) v += g[i * F + f] * table[b.rows[c][i] * F + f];
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
      dpos[i * D + d] += s * scale;
    });
  }
}

// g[i][f] = d_out[i, l*F + f] (one level's cotangent of n points, packed point-major).
inline void LoadLevelCotangent(const float* __restrict d_out, int64_t row_stride, int level,
                               int features, int n, float* __restrict g) {
  const float* __restrict src = d_out + level * features;
  if (features == 2) {
    for (int i = 0; i < n; ++i) std::memcpy(g + 2 * i, src + i * row_stride, 8);
    return;
  }
  for (int i = 0; i < n; ++i)
    for (int f = 0; f < features; ++f) g[i * features + f] = src[i * row_stride + f];
}

template <typename T>
T* ThreadScratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

// ---------------------------------------------------------------------------------------------
// Passes.
//
// Levels are visited in runs: consecutive levels whose slices of the table together fit in
// kRunBytes (a bigger level is a run of its own). A pass walks the points once per run, every
// block of points through all levels of the run. On a NeRF-size grid each hashed level (4 MB) is
// its own run, so one level's slice stays hot in L2 / the TLB while all points stream through it
// (visiting all levels per block thrashes both); a small grid (images) is one run, so positions
// are read and output rows written once per block.

constexpr int64_t kRunBytes = 1 << 20;

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

// Splits levels[0, n) (ascending level indices) into runs; returns run boundaries into levels.
inline std::vector<int> SplitRuns(const Grid& g, const int* levels, int n) {
  std::vector<int> bounds{0};
  int64_t bytes = 0;
  for (int k = 0; k < n; ++k) {
    const int64_t b = static_cast<int64_t>(g.levels[levels[k]].size) * g.features * 4;
    if (k > bounds.back() && bytes + b > kRunBytes) {
      bounds.push_back(k);
      bytes = 0;
    }
    bytes += b;
  }
  bounds.push_back(n);
  return bounds;
}

// Forward of levels[0, nl) for global points [begin, end) (over N * B).
template <int D, int kF>
void ForwardTask(const Args& a, const int* levels, int nl, int64_t begin, int64_t end) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int Fc = kF > 0 ? kF : F;
  const int64_t B = a.num_points, E = g.num_entries;
  thread_local std::vector<float> scratch;
  float* outT = ThreadScratch(scratch, static_cast<size_t>(F) * kBlock);
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
      for (int k = 0; k < nl; ++k) {
        const int l = levels[k];
        const Level& lv = g.levels[l];
        Corners<D>(lv, n, blk);
        GatherLevel<D, kF>(table + lv.offset * F, F, n, blk, outT, PrefetchLevel(lv, F));
        float* __restrict o = out + b0 * LF + l * Fc;
        for (int i = 0; i < n; ++i)
          for (int f = 0; f < Fc; ++f) o[i * LF + f] = outT[i * Fc + f];
      }
    }
    p = seg_end;
  }
}

// d_positions += the share of levels[0, nl), global points [begin, end); zero: start from zero.
template <int D, int kF>
void PositionGradTask(const Args& a, const int* levels, int nl, bool zero, int64_t begin,
                      int64_t end) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int64_t B = a.num_points, E = g.num_entries;
  thread_local std::vector<float> scratch;
  float* gl = ThreadScratch(scratch, static_cast<size_t>(F) * kBlock);
  Block<D> blk;
  for (int64_t p = begin; p < end;) {
    const int64_t n_field = p / B;
    const int64_t seg_end = std::min(end, (n_field + 1) * B);
    const float* table = a.table + a.fb->input_field(0, n_field) * E * F;
    const float* pos = a.positions + a.fb->input_field(1, n_field) * B * D;
    const float* dout = a.d_out + a.fb->input_field(2, n_field) * B * LF;
    float* dpos = a.d_positions + n_field * B * D;
    const int64_t lo = p - n_field * B, hi = seg_end - n_field * B;
    if (zero) std::fill(dpos + lo * D, dpos + hi * D, 0.0f);
    for (int64_t b0 = lo; b0 < hi; b0 += kBlock) {
      const int n = static_cast<int>(std::min<int64_t>(kBlock, hi - b0));
      LoadPositions<D>(pos + b0 * D, n, blk);
      for (int k = 0; k < nl; ++k) {
        const int l = levels[k];
        const Level& lv = g.levels[l];
        Corners<D>(lv, n, blk);
        LoadLevelCotangent(dout + b0 * LF, LF, l, F, n, gl);
        PositionGradLevel<D, kF>(table + lv.offset * F, F, lv.scale, n, blk, gl, dpos + b0 * D,
                                 PrefetchLevel(lv, F));
      }
    }
    p = seg_end;
  }
}

// d_table of field n_field, levels[0, nl): zeroes the levels' rows and accumulates every point
// into them in order. If partial != null (field n_field's [B, D] slice) also adds the levels'
// share of d_positions to it, levels in order.
template <int D, int kF>
void TableGradTask(const Args& a, int64_t n_field, const int* levels, int nl, float* partial) {
  const Grid& g = *a.grid;
  const int L = g.num_levels, F = g.features, LF = L * F;
  const int64_t B = a.num_points, E = g.num_entries;
  thread_local std::vector<float> scratch;
  float* gl = ThreadScratch(scratch, static_cast<size_t>(F) * kBlock);
  const float* table = a.table + a.fb->input_field(0, n_field) * E * F;
  const float* pos = a.positions + a.fb->input_field(1, n_field) * B * D;
  const float* dout = a.d_out + a.fb->input_field(2, n_field) * B * LF;
  float* dtab = a.d_table + n_field * E * F;
  for (int k = 0; k < nl; ++k) {
    const Level& lv = g.levels[levels[k]];
    std::memset(dtab + lv.offset * F, 0, sizeof(float) * lv.size * F);
  }
  Block<D> blk;
  for (int64_t b0 = 0; b0 < B; b0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, B - b0));
    LoadPositions<D>(pos + b0 * D, n, blk);
    for (int k = 0; k < nl; ++k) {
      const int l = levels[k];
      const Level& lv = g.levels[l];
      const bool pf = PrefetchLevel(lv, F);
      Corners<D>(lv, n, blk);
      LoadLevelCotangent(dout + b0 * LF, LF, l, F, n, gl);
      ScatterLevel<D, kF>(dtab + lv.offset * F, F, n, blk, gl, pf);
      if (partial)
        PositionGradLevel<D, kF>(table + lv.offset * F, F, lv.scale, n, blk, gl, partial + b0 * D, pf);
    }
  }
}

// Point ranges of the tasks of a point-parallel pass.
struct PointChunks {
  int64_t total, chunks;
  explicit PointChunks(int64_t t) : total(t), chunks((t + kPointChunk - 1) / kPointChunk) {}
  int64_t begin(int64_t c) const { return c * kPointChunk; }
  int64_t end(int64_t c) const { return std::min(total, (c + 1) * kPointChunk); }
};

inline std::vector<int> AllLevels(const Grid& g) {
  std::vector<int> levels(g.num_levels);
  for (int l = 0; l < g.num_levels; ++l) levels[l] = l;
  return levels;
}

template <int D, int kF>
void Forward(const Args& a) {
  const std::vector<int> levels = AllLevels(*a.grid);
  const std::vector<int> runs = SplitRuns(*a.grid, levels.data(), a.grid->num_levels);
  const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
  const PointChunks pc(a.fb->num_fields() * a.num_points);
  // Task t = (run t / chunks, chunk t % chunks): the threads sweep one run at a time.
  ParallelFor(num_runs * pc.chunks, [&](int64_t t) {
    const int64_t r = t / pc.chunks, c = t % pc.chunks;
    ForwardTask<D, kF>(a, levels.data() + runs[r], runs[r + 1] - runs[r], pc.begin(c), pc.end(c));
  });
}

template <int D, int kF>
void Backward(const Args& a) {
  const Grid& g = *a.grid;
  const int L = g.num_levels;
  const int64_t N = a.fb->num_fields();
  const int64_t total = N * a.num_points;
  if (!a.d_table) {
    if (!a.d_positions) return;
    // Run-major like the forward; a chunk's run r waits for its run r - 1 (claimed earlier, so in
    // progress or done: no deadlock), so every point sums its levels in order.
    const std::vector<int> levels = AllLevels(g);
    const std::vector<int> runs = SplitRuns(g, levels.data(), L);
    const int64_t num_runs = static_cast<int64_t>(runs.size()) - 1;
    const PointChunks pc(total);
    std::unique_ptr<std::atomic<int64_t>[]> done(new std::atomic<int64_t>[pc.chunks]);
    for (int64_t c = 0; c < pc.chunks; ++c) done[c].store(0, std::memory_order_relaxed);
    ParallelFor(num_runs * pc.chunks, [&](int64_t t) {
      const int64_t r = t / pc.chunks, c = t % pc.chunks;
      while (done[c].load(std::memory_order_acquire) < r) std::this_thread::yield();
      PositionGradTask<D, kF>(a, levels.data() + runs[r], runs[r + 1] - runs[r], r == 0,
                              pc.begin(c), pc.end(c));
      done[c].store(r + 1, std::memory_order_release);
    });
    return;
  }
  const int64_t units = N * L;
  if (!a.d_positions) {
    // One task per (field, level) unit; which thread runs it does not matter (one writer per row,
    // points in order). Biggest levels first, so the last tasks to run are the short ones.
    std::vector<int64_t> order(units);
    for (int64_t u = 0; u < units; ++u) order[u] = u;
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
      return g.levels[x % L].size > g.levels[y % L].size;
    });
    ParallelFor(units, [&](int64_t t) {
      const int l = static_cast<int>(order[t] % L);
      TableGradTask<D, kF>(a, order[t] / L, &l, 1, nullptr);
    });
    return;
  }
  // Fused: a fixed number of groups (independent of scheduling); group gi owns the units
  // u = n * L + l with u % num_groups == gi and adds their d_positions shares, levels in order, to
  // its partial sum. Group 0's partial is d_positions itself, the others' are added in group order.
  const int num_groups = static_cast<int>(std::min<int64_t>(CpuNumThreads(), units));
  const int64_t per = total * D;
  std::unique_ptr<float[]> scratch;
  if (num_groups > 1) scratch.reset(new float[static_cast<size_t>(per) * (num_groups - 1)]);
  ParallelFor(num_groups, [&](int64_t t) {
    float* partial = t == 0 ? a.d_positions : scratch.get() + (t - 1) * per;
    std::fill(partial, partial + per, 0.0f);
    std::vector<int> levels;
    for (int64_t n_field = 0; n_field < N; ++n_field) {
      levels.clear();
      for (int l = 0; l < L; ++l)
        if ((n_field * L + l) % num_groups == t) levels.push_back(l);
      const std::vector<int> runs = SplitRuns(g, levels.data(), static_cast<int>(levels.size()));
      for (size_t r = 0; r + 1 < runs.size(); ++r) {
        TableGradTask<D, kF>(a, n_field, levels.data() + runs[r], runs[r + 1] - runs[r],
                             partial + n_field * a.num_points * D);
      }
    }
  });
  if (num_groups > 1) {
    const int64_t chunk = kPointChunk * D;
    ParallelFor((per + chunk - 1) / chunk, [&](int64_t t) {
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
