// CUDA kernels of apex_fast.ops.weighted_grads (DESIGN.md "multi-objective gradient pipeline"):
// all K per-objective weight gradients of a linear layer from one backward,
//     G[k] = delta^T diag(W[:, k]) a.
// Written against raw pointers (no torch headers): compiled with nvcc alone in CI and linked into
// apex_fast._C by csrc/cuda_binding.cpp where torch has CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "apex_fast_cuda.h"

namespace {

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

constexpr int TILE = 64;   // output tile TILE x TILE (o x i) per block
constexpr int TM = 16;     // rows of M staged per step
constexpr int THREADS = 256;  // 16 x 16 threads, 4 x 4 outputs each

// grid (ceil(I / TILE), ceil(O / TILE), K)
template <typename T>
__global__ void __launch_bounds__(THREADS) weighted_grads_kernel(
    const T* __restrict__ delta, const T* __restrict__ a, const float* __restrict__ W, T* __restrict__ G,
    int64_t M, int64_t O, int64_t I, int64_t K) {
  __shared__ float Ds[TM][TILE + 4];  // delta tile scaled by W[:, k]
  __shared__ float As[TM][TILE + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * TILE;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * TILE;
  const int64_t k = blockIdx.z;
  float acc[4][4] = {};
  for (int64_t m0 = 0; m0 < M; m0 += TM) {
#pragma unroll
    for (int r = 0; r < (TM * TILE) / THREADS; ++r) {
      const int idx = tid + r * THREADS;
      const int mm = idx / TILE, cc = idx % TILE;
      const int64_t m = m0 + mm;
      const bool mok = m < M;
      const int64_t o = o0 + cc, i = i0 + cc;
      Ds[mm][cc] = (mok && o < O) ? to_f(delta[m * O + o]) * W[m * K + k] : 0.f;
      As[mm][cc] = (mok && i < I) ? to_f(a[m * I + i]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int mm = 0; mm < TM; ++mm) {
      float dv[4], av[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        dv[j] = Ds[mm][ty * 4 + j];
        av[j] = As[mm][tx * 4 + j];
      }
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(dv[p], av[q], acc[p][q]);
    }
    __syncthreads();
  }
  T* Gk = G + k * O * I;
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int64_t o = o0 + ty * 4 + p;
    if (o >= O) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t i = i0 + tx * 4 + q;
      if (i < I) Gk[o * I + i] = from_f<T>(acc[p][q]);
    }
  }
}

// out[m, k * side + q] = W[m, k] * x[m, q]; grid-stride over M * K * side
template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ x, const float* __restrict__ W, float* __restrict__ out,
                                  int64_t M, int64_t side, int64_t K) {
  const int64_t total = M * K * side;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = e % side;
    const int64_t mk = e / side;  // m * K + k
    const int64_t m = mk / K;
    out[e] = W[mk] * to_f(x[m * side + q]);
  }
}

template <typename T>
int launch_wg(const void* delta, const void* a, const float* W, void* G, int64_t M, int64_t O, int64_t I,
              int64_t K, cudaStream_t s) {
  if (O <= 0 || I <= 0 || K <= 0) return cudaSuccess;
  if (K > 65535 || (O + TILE - 1) / TILE > 65535) return cudaErrorInvalidConfiguration;
  dim3 grid(static_cast<unsigned>((I + TILE - 1) / TILE), static_cast<unsigned>((O + TILE - 1) / TILE),
            static_cast<unsigned>(K));
  weighted_grads_kernel<T><<<grid, THREADS, 0, s>>>(static_cast<const T*>(delta), static_cast<const T*>(a), W,
                                                    static_cast<T*>(G), M, O, I, K);
  return static_cast<int>(cudaGetLastError());
}

template <typename T>
int launch_scale(const void* x, const float* W, float* out, int64_t M, int64_t side, int64_t K, cudaStream_t s) {
  const int64_t total = M * K * side;
  if (total <= 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  scale_rows_kernel<T><<<blocks, threads, 0, s>>>(static_cast<const T*>(x), W, out, M, side, K);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" int apex_fast_weighted_grads_launch(int dtype, const void* delta, const void* a, const float* W,
                                               void* G, int64_t M, int64_t O, int64_t I, int64_t K,
                                               void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case APEX_F32: return launch_wg<float>(delta, a, W, G, M, O, I, K, s);
    case APEX_F16: return launch_wg<__half>(delta, a, W, G, M, O, I, K, s);
    case APEX_BF16: return launch_wg<__nv_bfloat16>(delta, a, W, G, M, O, I, K, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}

extern "C" int apex_fast_scale_rows_launch(int dtype, const void* x, const float* W, float* out, int64_t M,
                                           int64_t side, int64_t K, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case APEX_F32: return launch_scale<float>(x, W, out, M, side, K, s);
    case APEX_F16: return launch_scale<__half>(x, W, out, M, side, K, s);
    case APEX_BF16: return launch_scale<__nv_bfloat16>(x, W, out, M, side, K, s);
    default: return static_cast<int>(cudaErrorInvalidValue);
  }
}
