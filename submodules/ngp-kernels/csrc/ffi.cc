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
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "hash_grid.h"
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
        out["cpu"] = cpu;
#ifdef NGP_KERNELS_WITH_CUDA
        py::dict cuda;
        cuda["ngp_hash_grid_fwd"] = Capsule(NgpHashGridFwdCuda);
        cuda["ngp_hash_grid_bwd_table"] = Capsule(NgpHashGridBwdTableCuda);
        cuda["ngp_hash_grid_bwd_positions"] = Capsule(NgpHashGridBwdPositionsCuda);
        cuda["ngp_hash_grid_bwd_both"] = Capsule(NgpHashGridBwdBothCuda);
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
