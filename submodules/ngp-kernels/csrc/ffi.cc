// The only file that knows about XLA and Python: wraps the CPU (and, when built, CUDA) cores as
// typed XLA FFI handlers and hands their addresses to Python as PyCapsules (pybind11).
//
// Every handler takes the buffers and five per-level attributes:
//   scales f32[L], resolutions i64[L], sizes i64[L], offsets i64[L], dense i32[L]
// Targets (same names on "cpu" and "CUDA"):
//   ngp_hash_grid_fwd            (table[..., E, F], positions[..., B, D]) -> out[..., B, L*F]
//   ngp_hash_grid_bwd_table      (table, positions, d_out[..., B, L*F]) -> d_table[..., E, F]
//   ngp_hash_grid_bwd_positions  (table, positions, d_out) -> d_positions[..., B, D]
//   ngp_hash_grid_bwd_both       (table, positions, d_out) -> (d_table, d_positions)
// Leading ("field") dims of each input are equal to those of the results or 1 (broadcast).
//
// Volume rendering targets (same names on "cpu" and "CUDA"; R rays, S sample slots):
//   ngp_march_rays      (origins f32[R, 3], directions f32[R, 3], bitfield u8[G^3 / 8], aabb f32[2, 3])
//                       -> (positions f32[S, 3], directions f32[S, 3], ts f32[S], dts f32[S],
//                           ray_indices s32[S], valid pred[S], num_samples s32[], ray_counts s32[R])
//                       attrs grid_resolution i64, step_size f32, max_steps i64
//   ngp_composite_fwd   (sigmas f32[S], rgbs f32[S, 3], ts f32[S], dts f32[S], ray_indices s32[S],
//                        valid pred[S]) -> (colour f32[R, 3], opacity f32[R], depth f32[R])
//                       attr termination_threshold f32
//   ngp_composite_bwd   (the six inputs, d_colour f32[R, 3], d_opacity f32[R], d_depth f32[R])
//                       -> (d_sigmas f32[S], d_rgbs f32[S, 3]), attr termination_threshold f32
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>

#include "compositing.h"
#include "hash_grid.h"
#include "marching.h"
#include "xla/ffi/api/ffi.h"

#ifdef NGP_KERNELS_WITH_CUDA
#include <cuda_runtime_api.h>

#include "hash_grid_cuda.h"
#endif

namespace ffi = xla::ffi;
namespace py = pybind11;

namespace ngp_kernels {
namespace {

using F32Buffer = ffi::Buffer<ffi::F32>;
using F32Result = ffi::ResultBuffer<ffi::F32>;

struct Problem {
  Grid grid;
  FieldBroadcast fb;
  int64_t num_points = 0;  // B
};

// Validates shapes and builds the Grid and the field broadcast. `lead` are the leading dims of the
// first result; d_out may be null (forward).
ffi::Error Prepare(const F32Buffer& table, const F32Buffer& positions, const F32Buffer* d_out,
                   ffi::Span<const int64_t> lead, ffi::Span<const float> scales,
                   ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                   ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense, Problem* pb) {
  const auto td = table.dimensions(), pd = positions.dimensions();
  if (td.size() < 2 || pd.size() < 2)
    return ffi::Error::InvalidArgument("table and positions need rank >= 2");
  const size_t rank = lead.size();
  if (rank > static_cast<size_t>(kMaxFieldRank))
    return ffi::Error::InvalidArgument("too many leading (field) dims");
  const size_t L = scales.size();
  if (resolutions.size() != L || sizes.size() != L || offsets.size() != L || dense.size() != L)
    return ffi::Error::InvalidArgument("per-level attributes must all have num_levels entries");
  const int64_t E = td[td.size() - 2], F = td[td.size() - 1];
  const int64_t B = pd[pd.size() - 2], D = pd[pd.size() - 1];
  if (F < 1 || F > (1 << 20)) return ffi::Error::InvalidArgument("bad features_per_level");
  std::string err = MakeGrid(static_cast<int>(D), static_cast<int>(F), E, static_cast<int>(L),
                             scales.begin(), resolutions.begin(), sizes.begin(), offsets.begin(),
                             dense.begin(), &pb->grid);
  if (!err.empty()) return ffi::Error::InvalidArgument(err);
  pb->num_points = B;

  ffi::Span<const int64_t> in_dims[3] = {td, pd, pd};
  const int num_inputs = d_out ? 3 : 2;
  if (d_out) {
    in_dims[2] = d_out->dimensions();
    const auto gd = in_dims[2];
    if (gd.size() < 2 || gd[gd.size() - 2] != B || gd[gd.size() - 1] != static_cast<int64_t>(L) * F)
      return ffi::Error::InvalidArgument("d_out must be [..., B, num_levels * features]");
  }
  FieldBroadcast& fb = pb->fb;
  fb.rank = static_cast<int>(rank);
  for (size_t i = 0; i < rank; ++i) fb.dims[i] = lead[i];
  for (int k = 0; k < num_inputs; ++k) {
    const auto dims = in_dims[k];
    if (dims.size() != rank + 2)
      return ffi::Error::InvalidArgument("inputs must have the same number of leading dims");
    int64_t stride = 1;
    for (int i = static_cast<int>(rank) - 1; i >= 0; --i) {
      if (dims[i] == lead[i]) {
        fb.stride[k][i] = dims[i] == 1 ? 0 : stride;
      } else if (dims[i] == 1) {
        fb.stride[k][i] = 0;
      } else {
        return ffi::Error::InvalidArgument("leading dims must equal the result's or be 1");
      }
      stride *= dims[i];
    }
  }
  return ffi::Error::Success();
}

ffi::Span<const int64_t> Lead(const ffi::Span<const int64_t> dims) {
  return dims.first(dims.size() - 2);
}

// ---------------------------------------------------------------------------------------------
// CPU handlers.

ffi::Error FwdCpu(F32Buffer table, F32Buffer positions, F32Result out, ffi::Span<const float> scales,
                  ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                  ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  Problem pb;
  if (ffi::Error e = Prepare(table, positions, nullptr, Lead(out->dimensions()), scales, resolutions,
                             sizes, offsets, dense, &pb);
      e.failure())
    return e;
  HashGridForwardCpu(pb.grid, pb.fb, pb.num_points, table.typed_data(), positions.typed_data(),
                     out->typed_data());
  return ffi::Error::Success();
}

ffi::Error BwdCpu(F32Buffer table, F32Buffer positions, F32Buffer d_out, float* d_table,
                  float* d_positions, ffi::Span<const int64_t> lead, ffi::Span<const float> scales,
                  ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                  ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  Problem pb;
  if (ffi::Error e = Prepare(table, positions, &d_out, lead, scales, resolutions, sizes, offsets,
                             dense, &pb);
      e.failure())
    return e;
  HashGridBackwardCpu(pb.grid, pb.fb, pb.num_points, table.typed_data(), positions.typed_data(),
                      d_out.typed_data(), d_table, d_positions);
  return ffi::Error::Success();
}

ffi::Error BwdTableCpu(F32Buffer table, F32Buffer positions, F32Buffer d_out, F32Result d_table,
                       ffi::Span<const float> scales, ffi::Span<const int64_t> resolutions,
                       ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> offsets,
                       ffi::Span<const int32_t> dense) {
  return BwdCpu(table, positions, d_out, d_table->typed_data(), nullptr,
                Lead(d_table->dimensions()), scales, resolutions, sizes, offsets, dense);
}

ffi::Error BwdPositionsCpu(F32Buffer table, F32Buffer positions, F32Buffer d_out,
                           F32Result d_positions, ffi::Span<const float> scales,
                           ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                           ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  return BwdCpu(table, positions, d_out, nullptr, d_positions->typed_data(),
                Lead(d_positions->dimensions()), scales, resolutions, sizes, offsets, dense);
}

ffi::Error BwdBothCpu(F32Buffer table, F32Buffer positions, F32Buffer d_out, F32Result d_table,
                      F32Result d_positions, ffi::Span<const float> scales,
                      ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                      ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  return BwdCpu(table, positions, d_out, d_table->typed_data(), d_positions->typed_data(),
                Lead(d_table->dimensions()), scales, resolutions, sizes, offsets, dense);
}

#ifdef NGP_KERNELS_WITH_CUDA
// ---------------------------------------------------------------------------------------------
// CUDA handlers: same validation, kernels enqueued on the stream XLA hands us.

ffi::Error CudaStatus(cudaError_t err) {
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(std::string("ngp_kernels CUDA error: ") + cudaGetErrorString(err));
}

ffi::Error FwdCuda(cudaStream_t stream, F32Buffer table, F32Buffer positions, F32Result out,
                   ffi::Span<const float> scales, ffi::Span<const int64_t> resolutions,
                   ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> offsets,
                   ffi::Span<const int32_t> dense) {
  Problem pb;
  if (ffi::Error e = Prepare(table, positions, nullptr, Lead(out->dimensions()), scales, resolutions,
                             sizes, offsets, dense, &pb);
      e.failure())
    return e;
  return CudaStatus(HashGridForwardCuda(stream, pb.grid, pb.fb, pb.num_points, table.typed_data(),
                                        positions.typed_data(), out->typed_data()));
}

ffi::Error BwdCuda(cudaStream_t stream, F32Buffer table, F32Buffer positions, F32Buffer d_out,
                   float* d_table, float* d_positions, ffi::Span<const int64_t> lead,
                   ffi::Span<const float> scales, ffi::Span<const int64_t> resolutions,
                   ffi::Span<const int64_t> sizes, ffi::Span<const int64_t> offsets,
                   ffi::Span<const int32_t> dense) {
  Problem pb;
  if (ffi::Error e = Prepare(table, positions, &d_out, lead, scales, resolutions, sizes, offsets,
                             dense, &pb);
      e.failure())
    return e;
  return CudaStatus(HashGridBackwardCuda(stream, pb.grid, pb.fb, pb.num_points, table.typed_data(),
                                         positions.typed_data(), d_out.typed_data(), d_table,
                                         d_positions));
}

ffi::Error BwdTableCuda(cudaStream_t stream, F32Buffer table, F32Buffer positions, F32Buffer d_out,
                        F32Result d_table, ffi::Span<const float> scales,
                        ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                        ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  return BwdCuda(stream, table, positions, d_out, d_table->typed_data(), nullptr,
                 Lead(d_table->dimensions()), scales, resolutions, sizes, offsets, dense);
}

ffi::Error BwdPositionsCuda(cudaStream_t stream, F32Buffer table, F32Buffer positions,
                            F32Buffer d_out, F32Result d_positions, ffi::Span<const float> scales,
                            ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                            ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  return BwdCuda(stream, table, positions, d_out, nullptr, d_positions->typed_data(),
                 Lead(d_positions->dimensions()), scales, resolutions, sizes, offsets, dense);
}

ffi::Error BwdBothCuda(cudaStream_t stream, F32Buffer table, F32Buffer positions, F32Buffer d_out,
                       F32Result d_table, F32Result d_positions, ffi::Span<const float> scales,
                       ffi::Span<const int64_t> resolutions, ffi::Span<const int64_t> sizes,
                       ffi::Span<const int64_t> offsets, ffi::Span<const int32_t> dense) {
  return BwdCuda(stream, table, positions, d_out, d_table->typed_data(), d_positions->typed_data(),
                 Lead(d_table->dimensions()), scales, resolutions, sizes, offsets, dense);
}
#endif  // NGP_KERNELS_WITH_CUDA


// ---------------------------------------------------------------------------------------------
// Volume rendering: ray marching and compositing. Validation is shared by CPU and CUDA.

using S32Buffer = ffi::Buffer<ffi::S32>;
using S32Result = ffi::ResultBuffer<ffi::S32>;
using PredBuffer = ffi::Buffer<ffi::PRED>;
using PredResult = ffi::ResultBuffer<ffi::PRED>;
using U8Buffer = ffi::Buffer<ffi::U8>;

bool HasShape(ffi::Span<const int64_t> dims, std::initializer_list<int64_t> shape) {
  if (dims.size() != shape.size()) return false;
  size_t i = 0;
  for (int64_t s : shape)
    if (dims[i++] != s) return false;
  return true;
}

ffi::Error PrepareMarch(const F32Buffer& origins, const F32Buffer& directions, const U8Buffer& bitfield,
                        const F32Buffer& aabb, F32Result& positions, F32Result& dirs_out,
                        F32Result& ts, F32Result& dts, S32Result& ray_indices, PredResult& valid,
                        S32Result& num_samples, S32Result& ray_counts, int64_t grid_resolution,
                        float step_size, int64_t max_steps, MarchParams* pm, MarchOutputs* out) {
  const auto od = origins.dimensions();
  if (od.size() != 2 || od[1] != 3) return ffi::Error::InvalidArgument("origins must be [R, 3]");
  const int64_t R = od[0];
  if (!HasShape(directions.dimensions(), {R, 3}))
    return ffi::Error::InvalidArgument("directions must be [R, 3] like origins");
  if (!HasShape(aabb.dimensions(), {2, 3})) return ffi::Error::InvalidArgument("aabb must be [2, 3]");
  if (grid_resolution < 2 || grid_resolution > 2048 || (grid_resolution % 2) != 0)
    return ffi::Error::InvalidArgument("grid_resolution must be even and in [2, 2048]");
  const int64_t G = grid_resolution;
  if (!HasShape(bitfield.dimensions(), {G * G * G / 8}))
    return ffi::Error::InvalidArgument("bitfield must be [grid_resolution^3 / 8] uint8");
  if (max_steps < 0 || max_steps > (int64_t{1} << 23))
    return ffi::Error::InvalidArgument("max_steps must be in [0, 2^23]");
  const auto pd = positions->dimensions();
  if (pd.size() != 2 || pd[1] != 3) return ffi::Error::InvalidArgument("positions must be [S, 3]");
  const int64_t S = pd[0];
  if (!HasShape(dirs_out->dimensions(), {S, 3}) || !HasShape(ts->dimensions(), {S}) ||
      !HasShape(dts->dimensions(), {S}) || !HasShape(ray_indices->dimensions(), {S}) ||
      !HasShape(valid->dimensions(), {S}) || !HasShape(num_samples->dimensions(), {}) ||
      !HasShape(ray_counts->dimensions(), {R}))
    return ffi::Error::InvalidArgument("march_rays result shapes are inconsistent");
  if (R >= INT32_MAX) return ffi::Error::InvalidArgument("too many rays for int32 ray indices");
  pm->num_rays = R;
  pm->max_steps = max_steps;
  pm->max_samples = S;
  pm->grid_resolution = static_cast<int32_t>(G);
  pm->step_size = step_size;
  *out = MarchOutputs{positions->typed_data(),   dirs_out->typed_data(), ts->typed_data(),
                      dts->typed_data(),         ray_indices->typed_data(), valid->typed_data(),
                      num_samples->typed_data(), ray_counts->typed_data()};
  return ffi::Error::Success();
}

ffi::Error PrepareComposite(const F32Buffer& sigmas, const F32Buffer& rgbs, const F32Buffer& ts,
                            const F32Buffer& dts, const S32Buffer& ray_indices, const PredBuffer& valid,
                            int64_t num_rays, float threshold, CompositeInputs* in) {
  const auto sd = sigmas.dimensions();
  if (sd.size() != 1) return ffi::Error::InvalidArgument("sigmas must be [S]");
  const int64_t S = sd[0];
  if (!HasShape(rgbs.dimensions(), {S, 3}) || !HasShape(ts.dimensions(), {S}) ||
      !HasShape(dts.dimensions(), {S}) || !HasShape(ray_indices.dimensions(), {S}) ||
      !HasShape(valid.dimensions(), {S}))
    return ffi::Error::InvalidArgument("composite needs sigmas [S], rgbs [S, 3], ts, dts, ray_indices, valid [S]");
  *in = CompositeInputs{sigmas.typed_data(), rgbs.typed_data(),        ts.typed_data(),
                        dts.typed_data(),    ray_indices.typed_data(), valid.typed_data(),
                        S,                   num_rays,                 threshold};
  return ffi::Error::Success();
}

ffi::Error CheckRayOutputs(int64_t R, ffi::Span<const int64_t> colour, ffi::Span<const int64_t> opacity,
                           ffi::Span<const int64_t> depth) {
  if (!HasShape(colour, {R, 3}) || !HasShape(opacity, {R}) || !HasShape(depth, {R}))
    return ffi::Error::InvalidArgument("per-ray arrays must be colour [R, 3], opacity [R], depth [R]");
  return ffi::Error::Success();
}

int64_t NumRays(ffi::Span<const int64_t> opacity_dims) { return opacity_dims.size() == 1 ? opacity_dims[0] : -1; }

ffi::Error MarchRaysCpuHandler(F32Buffer origins, F32Buffer directions, U8Buffer bitfield, F32Buffer aabb,
                               F32Result positions, F32Result dirs_out, F32Result ts, F32Result dts,
                               S32Result ray_indices, PredResult valid, S32Result num_samples,
                               S32Result ray_counts, int64_t grid_resolution, float step_size,
                               int64_t max_steps) {
  MarchParams pm;
  MarchOutputs out;
  if (ffi::Error e = PrepareMarch(origins, directions, bitfield, aabb, positions, dirs_out, ts, dts,
                                  ray_indices, valid, num_samples, ray_counts, grid_resolution,
                                  step_size, max_steps, &pm, &out);
      e.failure())
    return e;
  MarchRaysCpu(pm, origins.typed_data(), directions.typed_data(), bitfield.typed_data(), aabb.typed_data(), out);
  return ffi::Error::Success();
}

ffi::Error CompositeFwdCpu(F32Buffer sigmas, F32Buffer rgbs, F32Buffer ts, F32Buffer dts,
                           S32Buffer ray_indices, PredBuffer valid, F32Result colour,
                           F32Result opacity, F32Result depth, float threshold) {
  CompositeInputs in;
  const int64_t R = NumRays(opacity->dimensions());
  if (ffi::Error e = PrepareComposite(sigmas, rgbs, ts, dts, ray_indices, valid, R, threshold, &in);
      e.failure())
    return e;
  if (ffi::Error e = CheckRayOutputs(R, colour->dimensions(), opacity->dimensions(), depth->dimensions());
      e.failure())
    return e;
  CompositeForwardCpu(in, colour->typed_data(), opacity->typed_data(), depth->typed_data());
  return ffi::Error::Success();
}

ffi::Error CompositeBwdCpu(F32Buffer sigmas, F32Buffer rgbs, F32Buffer ts, F32Buffer dts,
                           S32Buffer ray_indices, PredBuffer valid, F32Buffer d_colour,
                           F32Buffer d_opacity, F32Buffer d_depth, F32Result d_sigmas,
                           F32Result d_rgbs, float threshold) {
  CompositeInputs in;
  const int64_t R = NumRays(d_opacity.dimensions());
  if (ffi::Error e = PrepareComposite(sigmas, rgbs, ts, dts, ray_indices, valid, R, threshold, &in);
      e.failure())
    return e;
  if (ffi::Error e = CheckRayOutputs(R, d_colour.dimensions(), d_opacity.dimensions(), d_depth.dimensions());
      e.failure())
    return e;
  if (!HasShape(d_sigmas->dimensions(), {in.num_samples}) || !HasShape(d_rgbs->dimensions(), {in.num_samples, 3}))
    return ffi::Error::InvalidArgument("d_sigmas must be [S], d_rgbs [S, 3]");
  CompositeBackwardCpu(in, d_colour.typed_data(), d_opacity.typed_data(), d_depth.typed_data(),
                       d_sigmas->typed_data(), d_rgbs->typed_data());
  return ffi::Error::Success();
}

#ifdef NGP_KERNELS_WITH_CUDA
ffi::Error MarchRaysCudaHandler(cudaStream_t stream, ffi::ScratchAllocator scratch, F32Buffer origins,
                                F32Buffer directions, U8Buffer bitfield, F32Buffer aabb,
                                F32Result positions, F32Result dirs_out, F32Result ts, F32Result dts,
                                S32Result ray_indices, PredResult valid, S32Result num_samples,
                                S32Result ray_counts, int64_t grid_resolution, float step_size,
                                int64_t max_steps) {
  MarchParams pm;
  MarchOutputs out;
  if (ffi::Error e = PrepareMarch(origins, directions, bitfield, aabb, positions, dirs_out, ts, dts,
                                  ray_indices, valid, num_samples, ray_counts, grid_resolution,
                                  step_size, max_steps, &pm, &out);
      e.failure())
    return e;
  const size_t bytes = MarchRaysCudaScratchBytes(pm.num_rays, pm.grid_resolution);
  void* buffer = nullptr;
  if (bytes > 0) {
    std::optional<void*> mem = scratch.Allocate(bytes, 256);
    if (!mem.has_value()) return ffi::Error::Internal("ngp_march_rays: scratch allocation failed");
    buffer = *mem;
  }
  return CudaStatus(MarchRaysCuda(stream, pm, origins.typed_data(), directions.typed_data(),
                                  bitfield.typed_data(), aabb.typed_data(), out, buffer, bytes));
}

ffi::Error CompositeFwdCuda(cudaStream_t stream, F32Buffer sigmas, F32Buffer rgbs, F32Buffer ts,
                            F32Buffer dts, S32Buffer ray_indices, PredBuffer valid, F32Result colour,
                            F32Result opacity, F32Result depth, float threshold) {
  CompositeInputs in;
  const int64_t R = NumRays(opacity->dimensions());
  if (ffi::Error e = PrepareComposite(sigmas, rgbs, ts, dts, ray_indices, valid, R, threshold, &in);
      e.failure())
    return e;
  if (ffi::Error e = CheckRayOutputs(R, colour->dimensions(), opacity->dimensions(), depth->dimensions());
      e.failure())
    return e;
  return CudaStatus(CompositeForwardCuda(stream, in, colour->typed_data(), opacity->typed_data(),
                                         depth->typed_data()));
}

ffi::Error CompositeBwdCuda(cudaStream_t stream, F32Buffer sigmas, F32Buffer rgbs, F32Buffer ts,
                            F32Buffer dts, S32Buffer ray_indices, PredBuffer valid, F32Buffer d_colour,
                            F32Buffer d_opacity, F32Buffer d_depth, F32Result d_sigmas,
                            F32Result d_rgbs, float threshold) {
  CompositeInputs in;
  const int64_t R = NumRays(d_opacity.dimensions());
  if (ffi::Error e = PrepareComposite(sigmas, rgbs, ts, dts, ray_indices, valid, R, threshold, &in);
      e.failure())
    return e;
  if (ffi::Error e = CheckRayOutputs(R, d_colour.dimensions(), d_opacity.dimensions(), d_depth.dimensions());
      e.failure())
    return e;
  if (!HasShape(d_sigmas->dimensions(), {in.num_samples}) || !HasShape(d_rgbs->dimensions(), {in.num_samples, 3}))
    return ffi::Error::InvalidArgument("d_sigmas must be [S], d_rgbs [S, 3]");
  return CudaStatus(CompositeBackwardCuda(stream, in, d_colour.typed_data(), d_opacity.typed_data(),
                                          d_depth.typed_data(), d_sigmas->typed_data(),
                                          d_rgbs->typed_data()));
}
#endif  // NGP_KERNELS_WITH_CUDA

}  // namespace
}  // namespace ngp_kernels

// ---------------------------------------------------------------------------------------------
// Handler symbols. The bindings differ only in the number of buffers, the results and (CUDA) the
// stream context.

#define NGP_LEVEL_ATTRS(binding)                        \
  binding.Attr<ffi::Span<const float>>("scales")        \
      .Attr<ffi::Span<const int64_t>>("resolutions")    \
      .Attr<ffi::Span<const int64_t>>("sizes")          \
      .Attr<ffi::Span<const int64_t>>("offsets")        \
      .Attr<ffi::Span<const int32_t>>("dense")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridFwdCpu, ngp_kernels::FwdCpu,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdTableCpu, ngp_kernels::BwdTableCpu,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdPositionsCpu, ngp_kernels::BwdPositionsCpu,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdBothCpu, ngp_kernels::BwdBothCpu,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));

#ifdef NGP_KERNELS_WITH_CUDA
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridFwdCuda, ngp_kernels::FwdCuda,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdTableCuda, ngp_kernels::BwdTableCuda,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdPositionsCuda, ngp_kernels::BwdPositionsCuda,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpHashGridBwdBothCuda, ngp_kernels::BwdBothCuda,
                              NGP_LEVEL_ATTRS(ffi::Ffi::Bind()
                                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Arg<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()
                                                  .Ret<ffi::Buffer<ffi::F32>>()));
#endif


// Volume rendering handler symbols.
#define NGP_MARCH_BIND(binding)                            \
  binding.Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::U8>>()                         \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::S32>>()                        \
      .Ret<ffi::Buffer<ffi::PRED>>()                       \
      .Ret<ffi::Buffer<ffi::S32>>()                        \
      .Ret<ffi::Buffer<ffi::S32>>()                        \
      .Attr<int64_t>("grid_resolution")                    \
      .Attr<float>("step_size")                            \
      .Attr<int64_t>("max_steps")
#define NGP_COMPOSITE_INPUTS(binding)                      \
  binding.Arg<ffi::Buffer<ffi::F32>>()                     \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::S32>>()                        \
      .Arg<ffi::Buffer<ffi::PRED>>()
#define NGP_COMPOSITE_FWD_BIND(binding)                    \
  NGP_COMPOSITE_INPUTS(binding)                            \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Attr<float>("termination_threshold")
#define NGP_COMPOSITE_BWD_BIND(binding)                    \
  NGP_COMPOSITE_INPUTS(binding)                            \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Arg<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Ret<ffi::Buffer<ffi::F32>>()                        \
      .Attr<float>("termination_threshold")

XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpMarchRaysCpu, ngp_kernels::MarchRaysCpuHandler,
                              NGP_MARCH_BIND(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpCompositeFwdCpu, ngp_kernels::CompositeFwdCpu,
                              NGP_COMPOSITE_FWD_BIND(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpCompositeBwdCpu, ngp_kernels::CompositeBwdCpu,
                              NGP_COMPOSITE_BWD_BIND(ffi::Ffi::Bind()));
#ifdef NGP_KERNELS_WITH_CUDA
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpMarchRaysCuda, ngp_kernels::MarchRaysCudaHandler,
                              NGP_MARCH_BIND(ffi::Ffi::Bind()
                                                 .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                                 .Ctx<ffi::ScratchAllocator>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpCompositeFwdCuda, ngp_kernels::CompositeFwdCuda,
                              NGP_COMPOSITE_FWD_BIND(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(NgpCompositeBwdCuda, ngp_kernels::CompositeBwdCuda,
                              NGP_COMPOSITE_BWD_BIND(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()));
#endif

namespace {
template <typename Fn>
py::capsule Capsule(Fn* fn) {
  return py::capsule(reinterpret_cast<void*>(fn));
}
}  // namespace

PYBIND11_MODULE(_ngp_kernels, m) {
  m.doc() = "XLA FFI handlers of ngp_kernels (use the ngp_kernels package, not this module)";
  m.def(
      "registrations",
      [] {
        py::dict out, cpu;
        cpu["ngp_hash_grid_fwd"] = Capsule(NgpHashGridFwdCpu);
        cpu["ngp_hash_grid_bwd_table"] = Capsule(NgpHashGridBwdTableCpu);
        cpu["ngp_hash_grid_bwd_positions"] = Capsule(NgpHashGridBwdPositionsCpu);
        cpu["ngp_hash_grid_bwd_both"] = Capsule(NgpHashGridBwdBothCpu);
        cpu["ngp_march_rays"] = Capsule(NgpMarchRaysCpu);
        cpu["ngp_composite_fwd"] = Capsule(NgpCompositeFwdCpu);
        cpu["ngp_composite_bwd"] = Capsule(NgpCompositeBwdCpu);
        out["cpu"] = cpu;
#ifdef NGP_KERNELS_WITH_CUDA
        py::dict cuda;
        cuda["ngp_hash_grid_fwd"] = Capsule(NgpHashGridFwdCuda);
        cuda["ngp_hash_grid_bwd_table"] = Capsule(NgpHashGridBwdTableCuda);
        cuda["ngp_hash_grid_bwd_positions"] = Capsule(NgpHashGridBwdPositionsCuda);
        cuda["ngp_hash_grid_bwd_both"] = Capsule(NgpHashGridBwdBothCuda);
        cuda["ngp_march_rays"] = Capsule(NgpMarchRaysCuda);
        cuda["ngp_composite_fwd"] = Capsule(NgpCompositeFwdCuda);
        cuda["ngp_composite_bwd"] = Capsule(NgpCompositeBwdCuda);
        out["CUDA"] = cuda;
#endif
        return out;
      },
      "{platform: {target name: PyCapsule}} of the XLA FFI handlers compiled in.");
  m.def(
      "built_with_cuda",
      [] {
#ifdef NGP_KERNELS_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True when the CUDA handlers were compiled in.");
  m.def("cpu_num_threads", &ngp_kernels::CpuNumThreads,
        "Threads the CPU kernels partition their work over (NGP_KERNELS_NUM_THREADS overrides).");
}
