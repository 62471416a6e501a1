// C launchers of the apex_fast CUDA kernels. Raw pointers only (no torch headers), so the .cu files
// compile with plain nvcc; csrc/cuda_binding.cpp binds them to torch where torch has CUDA.
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes for the delta / a / G tensors
enum { APEX_F32 = 0, APEX_F16 = 1, APEX_BF16 = 2 };

// G[k, o, i] = sum_m delta[m, o] * W[m, k] * a[m, i]   (delta [M, O], a [M, I], W [M, K] float32,
// G [K, O, I]; all row-major contiguous; float32 accumulation). Returns a cudaError_t as int.
int apex_fast_weighted_grads_launch(int dtype, const void* delta, const void* a, const float* W, void* G,
                                    int64_t M, int64_t O, int64_t I, int64_t K, void* stream);

// out[m, k * side + q] = W[m, k] * x[m, q]   (x [M, side] of dtype, out float32 [M, K * side]): the
// scaling half of the "one GEMM" formulation, G = out^T-blocks @ a (done with cuBLAS by the binding).
int apex_fast_scale_rows_launch(int dtype, const void* x, const float* W, float* out, int64_t M, int64_t side,
                                int64_t K, void* stream);

#ifdef __cplusplus
}
#endif
