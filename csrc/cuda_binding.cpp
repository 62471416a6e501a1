// Binds the raw-pointer CUDA launchers (csrc/cuda/*.cu) to torch.ops.apex_fast for CUDA tensors.
// Compiled only where torch has CUDA (setup.py builds a CUDAExtension then); the CPU build never
// sees this file.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include "cuda/apex_fast_cuda.h"

namespace apex_fast {
namespace {

using at::Tensor;

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return APEX_F32;
    case at::kHalf: return APEX_F16;
    case at::kBFloat16: return APEX_BF16;
    default: TORCH_CHECK(false, "weighted_grads (CUDA): unsupported dtype ", t);
  }
}

Tensor weighted_grads_cuda(const Tensor& delta, const Tensor& a, const Tensor& W) {
  TORCH_CHECK(delta.is_cuda() && a.is_cuda() && W.is_cuda(), "weighted_grads (CUDA): tensors must be on CUDA");
  TORCH_CHECK(delta.dim() == 2 && a.dim() == 2 && W.dim() == 2, "expected delta [M, out], a [M, in], W [M, K]");
  TORCH_CHECK(delta.size(0) == a.size(0) && a.size(0) == W.size(0), "delta, a, W must share M");
  TORCH_CHECK(delta.scalar_type() == a.scalar_type(), "delta and a must share a dtype");
  TORCH_CHECK(delta.is_contiguous() && a.is_contiguous() && W.is_contiguous(), "delta, a, W must be contiguous");
  const int64_t M = delta.size(0), O = delta.size(1), I = a.size(1), K = W.size(1);
  if (delta.scalar_type() == at::kDouble) {
    Tensor D = (delta.unsqueeze(1) * W.to(at::kDouble).unsqueeze(2)).reshape({M, K * O});
    return at::mm(D.t(), a).reshape({K, O, I});
  }
  const int code = dtype_code(delta.scalar_type());
  Tensor Wf = W.to(at::kFloat).contiguous();
  auto stream = at::cuda::getCurrentCUDAStream().stream();
  // big layers: scale the smaller side by the K weights, then ONE cuBLAS GEMM for all K;
  // small ones: the fused tiled kernel (no scaled buffer)
  if (M * K * std::min(O, I) >= (int64_t(1) << 22) && O <= I) {
    Tensor buf = at::empty({M, K * O}, delta.options().dtype(at::kFloat));
    int err = apex_fast_scale_rows_launch(code, delta.data_ptr(), Wf.data_ptr<float>(), buf.data_ptr<float>(), M, O,
                                          K, stream);
    TORCH_CHECK(err == 0, "apex_fast_scale_rows_launch failed with CUDA error ", err);
    Tensor G = at::mm(buf.t(), a.scalar_type() == at::kFloat ? a : a.to(at::kFloat)).view({K, O, I});
    return G.scalar_type() == delta.scalar_type() ? G : G.to(delta.scalar_type());
  }
  Tensor G = at::empty({K, O, I}, delta.options());
  int err = apex_fast_weighted_grads_launch(code, delta.data_ptr(), a.data_ptr(), Wf.data_ptr<float>(),
                                            G.data_ptr(), M, O, I, K, stream);
  TORCH_CHECK(err == 0, "apex_fast_weighted_grads_launch failed with CUDA error ", err);
  return G;
}

}  // namespace

TORCH_LIBRARY_IMPL(apex_fast, CUDA, m) { m.impl("weighted_grads", &weighted_grads_cuda); }

}  // namespace apex_fast
