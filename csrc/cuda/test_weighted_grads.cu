// Standalone check of the CUDA launchers against a CPU loop (no torch). CI compiles and links it with
// nvcc (.ci/build_ext.sh); on a machine with a GPU run the binary: exit code 0 = all cases match.
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <vector>

#include "apex_fast_cuda.h"

static int check(int64_t M, int64_t O, int64_t I, int64_t K) {
  std::vector<float> d(M * O), a(M * I), w(M * K), g(K * O * I), ref(K * O * I, 0.f), sc(M * K * O);
  srand(1234);
  for (auto& x : d) x = rand() / (float)RAND_MAX - 0.5f;
  for (auto& x : a) x = rand() / (float)RAND_MAX - 0.5f;
  for (auto& x : w) x = rand() / (float)RAND_MAX - 0.5f;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t o = 0; o < O; ++o)
        for (int64_t i = 0; i < I; ++i) ref[(k * O + o) * I + i] += d[m * O + o] * w[m * K + k] * a[m * I + i];
  float *dd, *da, *dw, *dg, *ds;
  cudaMalloc(&dd, d.size() * 4); cudaMalloc(&da, a.size() * 4); cudaMalloc(&dw, w.size() * 4);
  cudaMalloc(&dg, g.size() * 4); cudaMalloc(&ds, sc.size() * 4);
  cudaMemcpy(dd, d.data(), d.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(da, a.data(), a.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dw, w.data(), w.size() * 4, cudaMemcpyHostToDevice);
  int err = apex_fast_weighted_grads_launch(APEX_F32, dd, da, dw, dg, M, O, I, K, nullptr);
  err |= apex_fast_scale_rows_launch(APEX_F32, dd, dw, ds, M, O, K, nullptr);
  cudaMemcpy(g.data(), dg, g.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(sc.data(), ds, sc.size() * 4, cudaMemcpyDeviceToHost);
  double worst = 0;
  for (size_t j = 0; j < g.size(); ++j) worst = fmax(worst, fabs(g[j] - ref[j]));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t o = 0; o < O; ++o) worst = fmax(worst, fabs(sc[(m * K + k) * O + o] - w[m * K + k] * d[m * O + o]));
  cudaFree(dd); cudaFree(da); cudaFree(dw); cudaFree(dg); cudaFree(ds);
  printf("M=%lld O=%lld I=%lld K=%lld err=%d max|diff|=%g\n", (long long)M, (long long)O, (long long)I,
         (long long)K, err, worst);
  return err != 0 || worst > 1e-3;
}

int main() {
  int bad = 0;
  bad |= check(100, 7, 9, 3);
  bad |= check(1000, 64, 130, 4);
  bad |= check(33, 1, 1, 1);
  bad |= check(257, 70, 65, 8);
  printf(bad ? "FAILED\n" : "OK\n");
  return bad;
}
