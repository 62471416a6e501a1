// apex_fast._C: CPU kernels of the fused multi-objective ops, registered as torch.ops.apex_fast.*.
// Contract: apex_fast/ops/reference.py (docs/SPEC.md sections 1, 3, 5). OpenMP for the data-parallel
// loops (torch's own libgomp is the one loaded at run time). The CUDA kernels live in csrc/cuda/*.cu
// (raw pointers, no torch headers) and are bound in csrc/cuda_binding.cpp where torch has CUDA.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__F16C__) || defined(__AVX__)
#include <immintrin.h>
#endif

namespace apex_fast {
namespace {

using at::Tensor;

// ------------------------------------------------------------------------------------------------
// dtype helpers: everything is computed in float32 (double for float64 tensors)

inline float to_f(float x) { return x; }
inline float to_f(double x) { return static_cast<float>(x); }
inline float to_f(c10::Half x) { return static_cast<float>(x); }
inline float to_f(c10::BFloat16 x) { return static_cast<float>(x); }

// contiguous run of T -> float (vectorisable)
template <typename T>
inline void load_f32(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
}
template <>
inline void load_f32<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <>
inline void load_f32<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}
#if defined(__F16C__)
template <>
inline void load_f32<c10::Half>(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
#endif

// float -> T, round to nearest even (as torch's .to())
template <typename T>
inline void store_f32(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}
template <>
inline void store_f32<float>(const float* src, float* dst, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}
template <>
inline void store_f32<c10::BFloat16>(const float* src, c10::BFloat16* dst, int64_t n) {
  const uint32_t* s = reinterpret_cast<const uint32_t*>(src);
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u = s[i];
    bool nan = (u & 0x7fffffffu) > 0x7f800000u;
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    d[i] = nan ? static_cast<uint16_t>(0x7fc0u) : static_cast<uint16_t>(r);
  }
}
#if defined(__F16C__)
template <>
inline void store_f32<c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}
#endif

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline void check_float_dtype(const Tensor& t, const char* name) {
  auto d = t.scalar_type();
  TORCH_CHECK(d == at::kFloat || d == at::kDouble || d == at::kHalf || d == at::kBFloat16, name,
              " must be float16/bfloat16/float32/float64, got ", d);
}

// ------------------------------------------------------------------------------------------------
// group ids -> dense index in sorted-id order (as torch.unique): open-addressing hash, O(N + G log G)

struct Dense {
  std::vector<int64_t> gid;  // [N]
  int64_t G = 0;
};

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30; x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27; x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

Dense densify(const int64_t* ids, int64_t N) {
  uint64_t cap = 16;
  while (cap < static_cast<uint64_t>(2 * N)) cap <<= 1;
  const uint64_t mask = cap - 1;
  std::vector<int64_t> keys(cap);
  std::vector<int32_t> slot(cap, -1);
  std::vector<int64_t> uniq;
  std::vector<int32_t> first(N);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t id = ids[i];
    uint64_t h = mix64(static_cast<uint64_t>(id)) & mask;
    while (slot[h] != -1 && keys[h] != id) h = (h + 1) & mask;
    if (slot[h] == -1) {
      keys[h] = id;
      slot[h] = static_cast<int32_t>(uniq.size());
      uniq.push_back(id);
    }
    first[i] = slot[h];
  }
  const int64_t G = static_cast<int64_t>(uniq.size());
  std::vector<int32_t> order(G);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return uniq[a] < uniq[b]; });
  std::vector<int32_t> rank(G);
  for (int64_t j = 0; j < G; ++j) rank[order[j]] = static_cast<int32_t>(j);
  Dense d;
  d.G = G;
  d.gid.resize(N);
  for (int64_t i = 0; i < N; ++i) d.gid[i] = rank[first[i]];
  return d;
}

// NaN-aware per-group, per-column statistics (double accumulation, population std; a group whose
// finite entries are all equal has std exactly 0).
struct GroupStats {
  std::vector<double> cnt, mean, std;  // [G * K]
};

// Rows grouped by a counting sort (CSR), then every group's statistics are accumulated in registers
// (no read-modify-write of per-group arrays per element, which bound the naive loop).
template <int KC>
void group_stats_csr(const float* x, const std::vector<int32_t>& start, const std::vector<int32_t>& rows,
                     int64_t G, int64_t K, GroupStats& s) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  for (int64_t g = 0; g < G; ++g) {
    double cnt[KC], s1[KC], s2[KC];
    float mx[KC], mn[KC];
    for (int k = 0; k < KC; ++k) { cnt[k] = 0; s1[k] = 0; s2[k] = 0; mx[k] = -inf; mn[k] = inf; }
    const int32_t b = start[g], e = start[g + 1];
    for (int32_t r = b; r < e; ++r) {
      const float* xr = x + static_cast<int64_t>(rows[r]) * K;
      for (int k = 0; k < KC; ++k) {
        if (k >= K) break;
        const float v = xr[k];
        const bool f = std::isfinite(v);
        cnt[k] += f ? 1.0 : 0.0;
        s1[k] += f ? v : 0.f;
        mx[k] = f ? std::max(mx[k], v) : mx[k];
        mn[k] = f ? std::min(mn[k], v) : mn[k];
      }
    }
    double mean[KC];
    for (int k = 0; k < KC && k < K; ++k) mean[k] = s1[k] / std::max(cnt[k], 1.0);
    for (int32_t r = b; r < e; ++r) {
      const float* xr = x + static_cast<int64_t>(rows[r]) * K;
      for (int k = 0; k < KC; ++k) {
        if (k >= K) break;
        const float v = xr[k];
        const double dv = std::isfinite(v) ? v - mean[k] : 0.0;
        s2[k] += dv * dv;
      }
    }
    for (int k = 0; k < KC && k < K; ++k) {
      const double sd = std::sqrt(s2[k] / std::max(cnt[k], 1.0));
      s.cnt[g * K + k] = cnt[k];
      s.mean[g * K + k] = mean[k];
      s.std[g * K + k] = (mx[k] > mn[k] && sd > 0) ? sd : 0.0;
    }
  }
}

GroupStats group_stats(const float* x, const Dense& d, int64_t N, int64_t K) {
  const int64_t G = d.G, GK = G * K;
  GroupStats s;
  s.cnt.assign(GK, 0.0);
  s.mean.assign(GK, 0.0);
  s.std.assign(GK, 0.0);
  std::vector<int32_t> start(G + 1, 0), rows(N);
  for (int64_t i = 0; i < N; ++i) ++start[d.gid[i] + 1];
  for (int64_t g = 0; g < G; ++g) start[g + 1] += start[g];
  std::vector<int32_t> cur(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < N; ++i) rows[cur[d.gid[i]]++] = static_cast<int32_t>(i);
  if (K <= 1) group_stats_csr<1>(x, start, rows, G, K, s);
  else if (K <= 4) group_stats_csr<4>(x, start, rows, G, K, s);
  else if (K <= 8) group_stats_csr<8>(x, start, rows, G, K, s);
  else if (K <= 16) group_stats_csr<16>(x, start, rows, G, K, s);
  else if (K <= 64) group_stats_csr<64>(x, start, rows, G, K, s);
  else TORCH_CHECK(false, "apex_fast: at most 64 objectives (K) are supported, got ", K);
  return s;
}

std::vector<float> rewards_f32(const Tensor& R) {
  const int64_t n = R.numel();
  std::vector<float> x(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, R.scalar_type(), "apex_fast_rewards", [&] {
    load_f32(R.data_ptr<scalar_t>(), x.data(), n);
  });
  return x;
}

void check_rewards(const Tensor& R, const Tensor& ids) {
  TORCH_CHECK(R.device().is_cpu() && ids.device().is_cpu(), "apex_fast CPU kernel got non-CPU tensors");
  check_float_dtype(R, "R");
  TORCH_CHECK(R.dim() == 2, "R must be [N, K], got ", R.sizes());
  TORCH_CHECK(R.is_contiguous(), "R must be contiguous");
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.size(0) == R.size(0) && ids.is_contiguous(),
              "group_ids must be contiguous int64 [N] with N = ", R.size(0));
}

std::vector<double> floor_vec(const c10::optional<Tensor>& floor, int64_t K) {
  std::vector<double> f(K, 0.0);
  if (floor.has_value() && floor->defined()) {
    Tensor t = floor->to(at::kDouble).contiguous();
    TORCH_CHECK(t.numel() == K, "std_floor must have K = ", K, " values, got ", t.numel());
    std::memcpy(f.data(), t.data_ptr<double>(), K * sizeof(double));
  }
  return f;
}

// ------------------------------------------------------------------------------------------------
// group_normalize / dual_stage_advantages

Tensor group_normalize_cpu(const Tensor& R, const Tensor& ids, bool global_std, double eps,
                           const c10::optional<Tensor>& floor) {
  check_rewards(R, ids);
  const int64_t N = R.size(0), K = R.size(1);
  Tensor A = at::empty({N, K}, R.options().dtype(at::kFloat));
  if (N == 0 || K == 0) return A;
  const bool has_floor = floor.has_value() && floor->defined();
  const std::vector<double> fl = floor_vec(floor, K);
  const std::vector<float> x = rewards_f32(R);
  const Dense d = densify(ids.data_ptr<int64_t>(), N);
  const GroupStats s = group_stats(x.data(), d, N, K);
  std::vector<double> gstd(K, 0.0);
  if (global_std) {
    std::vector<double> c(K, 0.0), m(K, 0.0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < K; ++k)
        if (std::isfinite(x[i * K + k])) { c[k] += 1; m[k] += x[i * K + k]; }
    for (int64_t k = 0; k < K; ++k) m[k] /= std::max(c[k], 1.0);
    for (int64_t i = 0; i < N; ++i)
      for (int64_t k = 0; k < K; ++k)
        if (std::isfinite(x[i * K + k])) { const double dv = x[i * K + k] - m[k]; gstd[k] += dv * dv; }
    for (int64_t k = 0; k < K; ++k) gstd[k] = std::sqrt(gstd[k] / std::max(c[k], 1.0));
  }
  // per (group, column): mean and 1 / (denominator + eps), 0 for dead (zero-variance) groups, so the
  // per-element work is one subtract and one multiply
  const int64_t GK = d.G * K;
  std::vector<float> mu(GK), inv(GK);
  for (int64_t j = 0; j < GK; ++j) {
    const int64_t k = j % K;
    double den = global_std ? gstd[k] : s.std[j];
    if (has_floor) den = std::max(den, fl[k]);
    mu[j] = static_cast<float>(s.mean[j]);
    inv[j] = s.std[j] > 0 ? static_cast<float>(1.0 / (den + eps)) : 0.f;
  }
  float* a = A.data_ptr<float>();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = d.gid[i] * K;
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[i * K + k];
      const float r = (v - mu[g + k]) * inv[g + k];
      a[i * K + k] = (std::isfinite(v) && inv[g + k] != 0.f) ? r : 0.f;
    }
  }
  return A;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dual_stage_cpu(
    const Tensor& R, const Tensor& ids, const Tensor& weights, const c10::optional<Tensor>& floor, double eps,
    double clip) {
  check_rewards(R, ids);
  const int64_t N = R.size(0), K = R.size(1);
  TORCH_CHECK(weights.numel() == K, "weights must be [K = ", K, "], got ", weights.numel(), " values");
  TORCH_CHECK(N > 0 && K > 0, "dual_stage_advantages: empty R");
  const std::vector<double> fl = floor_vec(floor, K);
  Tensor wt = weights.to(at::kFloat).contiguous();
  const float* w = wt.data_ptr<float>();
  const std::vector<float> x = rewards_f32(R);
  const Dense d = densify(ids.data_ptr<int64_t>(), N);
  const GroupStats s = group_stats(x.data(), d, N, K);
  const int64_t G = d.G;
  auto fopt = R.options().dtype(at::kFloat);
  Tensor A = at::empty({N}, fopt), Ahat = at::empty({N, K}, fopt), S = at::empty({N}, fopt);
  Tensor inv = at::empty({N}, R.options().dtype(at::kLong));
  Tensor count = at::empty({G, K}, fopt), mean = at::empty({G, K}, fopt), stdt = at::empty({G, K}, fopt);
  Tensor st = at::empty({3}, fopt);
  float* ah = Ahat.data_ptr<float>();
  float* sp = S.data_ptr<float>();
  int64_t* ip = inv.data_ptr<int64_t>();
  for (int64_t j = 0; j < G * K; ++j) {
    count.data_ptr<float>()[j] = static_cast<float>(s.cnt[j]);
    mean.data_ptr<float>()[j] = static_cast<float>(s.mean[j]);
    stdt.data_ptr<float>()[j] = static_cast<float>(s.std[j]);
  }
  std::vector<float> mu(G * K), rinv(G * K);
  for (int64_t j = 0; j < G * K; ++j) {
    mu[j] = static_cast<float>(s.mean[j]);
    rinv[j] = s.std[j] > 0 ? static_cast<float>(1.0 / (std::max(s.std[j], fl[j % K]) + eps)) : 0.f;
  }
  double sum = 0.0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t g = d.gid[i] * K;
    ip[i] = d.gid[i];
    float si = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[i * K + k];
      const float r = (v - mu[g + k]) * rinv[g + k];
      const float a = (std::isfinite(v) && rinv[g + k] != 0.f) ? r : 0.f;
      ah[i * K + k] = a;
      si += a * w[k];
    }
    sp[i] = si;
    sum += si;
  }
  const double bm = sum / N;
  double ss = 0.0;
  for (int64_t i = 0; i < N; ++i) ss += (sp[i] - bm) * (sp[i] - bm);
  const double bs = std::sqrt(ss / N);
  float* ap = A.data_ptr<float>();
  int64_t nclip = 0;
  for (int64_t i = 0; i < N; ++i) {
    double a = (sp[i] - bm) / (bs + eps);
    a = std::min(std::max(a, -clip), clip);
    if (sp[i] == 0.f) a = 0.0;
    ap[i] = static_cast<float>(a);
    nclip += std::fabs(ap[i]) >= static_cast<float>(clip);
  }
  st.data_ptr<float>()[0] = static_cast<float>(bm);
  st.data_ptr<float>()[1] = static_cast<float>(bs);
  st.data_ptr<float>()[2] = static_cast<float>(nclip) / N;
  return {A, Ahat, inv, count, mean, stdt, S, st};
}

// ------------------------------------------------------------------------------------------------
// gram / combine over many [K, n_i] blocks, one pass, OpenMP over (block, chunk) work items

constexpr int64_t kChunk = 4096;  // elements per row per work item

typedef float v8f __attribute__((vector_size(32)));
inline v8f loadu8(const float* p) { v8f v; std::memcpy(&v, p, sizeof(v)); return v; }
inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// acc[a*K+b] += <rows[a], rows[b]> over len elements (lower triangle), every element read once
template <int K>
void gram_tile(const float* const* rows, int64_t len, double* acc) {
  constexpr int NP = K * (K + 1) / 2;
  v8f s[NP];
  for (int j = 0; j < NP; ++j) s[j] = v8f{0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= len; p += 8) {
    v8f x[K];
    for (int k = 0; k < K; ++k) x[k] = loadu8(rows[k] + p);
    int j = 0;
    for (int a = 0; a < K; ++a)
      for (int b = 0; b <= a; ++b) s[j++] += x[a] * x[b];
  }
  int j = 0;
  for (int a = 0; a < K; ++a)
    for (int b = 0; b <= a; ++b, ++j) {
      float t = hsum8(s[j]);
      for (int64_t q = p; q < len; ++q) t += rows[a][q] * rows[b][q];
      acc[a * K + b] += t;
    }
}

void gram_tile_generic(const float* const* rows, int K, int64_t len, double* acc) {
  for (int a = 0; a < K; ++a)
    for (int b = 0; b <= a; ++b) {
      const float* x = rows[a];
      const float* y = rows[b];
      float t = 0.f;
#pragma omp simd reduction(+ : t)
      for (int64_t q = 0; q < len; ++q) t += x[q] * y[q];
      acc[a * K + b] += t;
    }
}

void gram_tile_f32(const float* const* rows, int K, int64_t len, double* acc) {
  switch (K) {
    case 1: return gram_tile<1>(rows, len, acc);
    case 2: return gram_tile<2>(rows, len, acc);
    case 3: return gram_tile<3>(rows, len, acc);
    case 4: return gram_tile<4>(rows, len, acc);
    case 5: return gram_tile<5>(rows, len, acc);
    case 6: return gram_tile<6>(rows, len, acc);
    case 7: return gram_tile<7>(rows, len, acc);
    case 8: return gram_tile<8>(rows, len, acc);
    default: return gram_tile_generic(rows, K, len, acc);
  }
}

// Rows whose byte stride is a multiple of 256 MiB conflict in DRAM when K of them are streamed in
// lockstep (measured on the dev VM, 1 thread: a [4, 2^26] fp32 J was read at ~10 GB/s instead of
// ~25; [4, 2^25] at ~15; 64 MiB, 96 MiB or 2^26 + 7184 floats were fine). Such blocks are read one
// row at a time in 128 KiB bursts through an L2 scratch instead (~14 GB/s at 2^26; it did not help
// at 2^25). Machine-specific: APEX_FAST_STAGE=0/1 overrides.
inline bool aliasing_stride(int64_t bytes) {
  static const char* env = std::getenv("APEX_FAST_STAGE");  // benchmarking override: 0 never, 1 always
  if (env && env[0]) return env[0] == '1';
  return bytes % (int64_t(256) << 20) == 0;
}

struct WorkItem {
  int32_t block;
  int64_t start;
};

constexpr int64_t kStageChunk = 32768;  // staged blocks: long single-stream bursts (128 KiB per fp32 row)

std::vector<WorkItem> work_items(const std::vector<int64_t>& ns, const std::vector<char>* stage = nullptr) {
  std::vector<WorkItem> items;
  for (size_t b = 0; b < ns.size(); ++b) {
    const int64_t ch = (stage && (*stage)[b]) ? kStageChunk : kChunk;
    for (int64_t s = 0; s < ns[b]; s += ch) items.push_back({static_cast<int32_t>(b), s});
  }
  return items;
}

void check_blocks(const std::vector<Tensor>& J, int64_t& K, std::vector<int64_t>& ns) {
  TORCH_CHECK(!J.empty(), "J is an empty list");
  K = J[0].size(0);
  for (size_t i = 0; i < J.size(); ++i) {
    const Tensor& t = J[i];
    TORCH_CHECK(t.device().is_cpu(), "J[", i, "] is not a CPU tensor");
    TORCH_CHECK(t.dim() == 2 && t.size(0) == K, "J[", i, "] must be [K = ", K, ", n], got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == J[0].scalar_type(), "J[", i, "] dtype differs from J[0]");
    TORCH_CHECK(t.is_contiguous(), "J[", i, "] must be contiguous");
    ns.push_back(t.size(1));
  }
  check_float_dtype(J[0], "J");
}

template <typename T>
void gram_impl(const std::vector<Tensor>& J, int64_t K, const std::vector<int64_t>& ns, double* out) {
  std::vector<const T*> base(J.size());
  std::vector<char> stage(J.size());  // fp32 blocks read in place unless their rows alias
  for (size_t i = 0; i < J.size(); ++i) {
    base[i] = J[i].data_ptr<T>();
    stage[i] = std::is_same<T, float>::value && K > 1 && aliasing_stride(ns[i] * sizeof(T));
  }
  const std::vector<WorkItem> items = work_items(ns, &stage);
  const int64_t nitems = static_cast<int64_t>(items.size());
  int64_t total = 0;
  for (auto n : ns) total += n * K;
  const int nt = total < (1 << 16) ? 1 : std::max(1, std::min<int>(num_threads(), static_cast<int>(nitems)));
  std::vector<double> part(static_cast<size_t>(nt) * K * K, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    double* acc = part.data() + static_cast<size_t>(tid) * K * K;
    std::vector<const float*> rows(K);
    std::vector<float> scratch(K * kStageChunk);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < nitems; ++it) {
      const WorkItem w = items[it];
      const int64_t n = ns[w.block];
      const int64_t len = std::min(stage[w.block] ? kStageChunk : kChunk, n - w.start);
      for (int64_t k = 0; k < K; ++k) {
        const T* src = base[w.block] + k * n + w.start;
        if (!std::is_same<T, float>::value || stage[w.block]) {  // convert / one DRAM stream at a time
          load_f32(src, scratch.data() + k * kStageChunk, len);
          rows[k] = scratch.data() + k * kStageChunk;
        } else {
          rows[k] = reinterpret_cast<const float*>(src);
        }
      }
      gram_tile_f32(rows.data(), static_cast<int>(K), len, acc);
    }
  }
  for (int t = 0; t < nt; ++t)
    for (int64_t j = 0; j < K * K; ++j) out[j] += part[static_cast<size_t>(t) * K * K + j];
}

void gram_impl_f64(const std::vector<Tensor>& J, int64_t K, const std::vector<int64_t>& ns, double* out) {
  for (size_t b = 0; b < J.size(); ++b) {
    const double* x = J[b].data_ptr<double>();
    const int64_t n = ns[b];
    for (int64_t a = 0; a < K; ++a)
      for (int64_t c = 0; c <= a; ++c) {
        double t = 0.0;
#pragma omp parallel for reduction(+ : t) schedule(static) if (n > (1 << 16))
        for (int64_t q = 0; q < n; ++q) t += x[a * n + q] * x[c * n + q];
        out[a * K + c] += t;
      }
  }
}

Tensor gram_cpu(at::TensorList Jl) {
  std::vector<Tensor> J(Jl.begin(), Jl.end());
  int64_t K = 0;
  std::vector<int64_t> ns;
  check_blocks(J, K, ns);
  std::vector<double> acc(K * K, 0.0);
  switch (J[0].scalar_type()) {
    case at::kFloat: gram_impl<float>(J, K, ns, acc.data()); break;
    case at::kHalf: gram_impl<c10::Half>(J, K, ns, acc.data()); break;
    case at::kBFloat16: gram_impl<c10::BFloat16>(J, K, ns, acc.data()); break;
    case at::kDouble: gram_impl_f64(J, K, ns, acc.data()); break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
  const bool f64 = J[0].scalar_type() == at::kDouble;
  Tensor M = at::empty({K, K}, J[0].options().dtype(f64 ? at::kDouble : at::kFloat));
  for (int64_t a = 0; a < K; ++a)
    for (int64_t b = 0; b <= a; ++b) {
      if (f64) {
        M.data_ptr<double>()[a * K + b] = M.data_ptr<double>()[b * K + a] = acc[a * K + b];
      } else {
        M.data_ptr<float>()[a * K + b] = M.data_ptr<float>()[b * K + a] = static_cast<float>(acc[a * K + b]);
      }
    }
  return M;
}

// dst[p] = sum_k c[k] * rows[k][p] in one pass; `stream`: non-temporal stores (outputs far larger
// than the caches: no read-for-ownership of the destination, no eviction of the inputs)
template <int K>
void combine_tile(const float* const* rows, const float* c, float* dst, int64_t len, bool stream) {
  v8f cv[K];
  for (int k = 0; k < K; ++k) cv[k] = v8f{c[k], c[k], c[k], c[k], c[k], c[k], c[k], c[k]};
#if defined(__AVX__)
  stream = stream && (reinterpret_cast<uintptr_t>(dst) % 32) == 0;
#else
  stream = false;
#endif
  int64_t p = 0;
  for (; p + 8 <= len; p += 8) {
    v8f v = cv[0] * loadu8(rows[0] + p);
    for (int k = 1; k < K; ++k) v += cv[k] * loadu8(rows[k] + p);
#if defined(__AVX__)
    if (stream) {
      _mm256_stream_ps(dst + p, reinterpret_cast<__m256>(v));
      continue;
    }
#endif
    std::memcpy(dst + p, &v, sizeof(v));
  }
  for (; p < len; ++p) {
    float t = 0.f;
    for (int k = 0; k < K; ++k) t += c[k] * rows[k][p];
    dst[p] = t;
  }
}

bool combine_tile_f32(int K, const float* const* rows, const float* c, float* dst, int64_t len, bool stream) {
  switch (K) {
    case 1: combine_tile<1>(rows, c, dst, len, stream); return true;
    case 2: combine_tile<2>(rows, c, dst, len, stream); return true;
    case 3: combine_tile<3>(rows, c, dst, len, stream); return true;
    case 4: combine_tile<4>(rows, c, dst, len, stream); return true;
    case 5: combine_tile<5>(rows, c, dst, len, stream); return true;
    case 6: combine_tile<6>(rows, c, dst, len, stream); return true;
    case 7: combine_tile<7>(rows, c, dst, len, stream); return true;
    case 8: combine_tile<8>(rows, c, dst, len, stream); return true;
    default: return false;
  }
}

template <typename T, typename O>
void combine_impl(const std::vector<Tensor>& J, const std::vector<Tensor>& out, const std::vector<float>& c,
                  int64_t K, const std::vector<int64_t>& ns) {
  std::vector<const T*> base(J.size());
  std::vector<O*> obase(J.size());
  std::vector<char> stage(J.size());  // aliasing rows: accumulate row by row in an L2 scratch
  for (size_t i = 0; i < J.size(); ++i) {
    base[i] = J[i].data_ptr<T>();
    obase[i] = out[i].data_ptr<O>();
    stage[i] = K > 1 && aliasing_stride(ns[i] * static_cast<int64_t>(sizeof(T)));
  }
  const std::vector<WorkItem> items = work_items(ns, &stage);
  const int64_t nitems = static_cast<int64_t>(items.size());
  int64_t total = 0;
  for (auto n : ns) total += n * K;
  const int nt = total < (1 << 16) ? 1 : std::max(1, std::min<int>(num_threads(), static_cast<int>(nitems)));
  constexpr bool f32 = std::is_same<T, float>::value && std::is_same<O, float>::value;
  const bool stream = f32 && total / K * static_cast<int64_t>(sizeof(float)) >= (int64_t(16) << 20);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<float> acc(kStageChunk), row(std::is_same<T, float>::value ? 0 : kStageChunk);
    std::vector<const float*> rows(K);
#pragma omp for schedule(static)
    for (int64_t it = 0; it < nitems; ++it) {
      const WorkItem w = items[it];
      const int64_t n = ns[w.block];
      const bool st = stage[w.block];
      const int64_t len = std::min(st ? kStageChunk : kChunk, n - w.start);
      float* d = (std::is_same<O, float>::value && !st) ? reinterpret_cast<float*>(obase[w.block] + w.start)
                                                         : acc.data();
      if constexpr (f32) {
        if (!st) {
          for (int64_t k = 0; k < K; ++k) rows[k] = reinterpret_cast<const float*>(base[w.block] + k * n + w.start);
          if (combine_tile_f32(static_cast<int>(K), rows.data(), c.data(), d, len, stream)) continue;
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const T* src = base[w.block] + k * n + w.start;
        const float* x;
        if constexpr (std::is_same<T, float>::value) {
          x = src;
        } else {
          load_f32(src, row.data(), len);
          x = row.data();
        }
        const float ck = c[k];
        if (k == 0) {
#pragma omp simd
          for (int64_t q = 0; q < len; ++q) d[q] = ck * x[q];
        } else {
#pragma omp simd
          for (int64_t q = 0; q < len; ++q) d[q] += ck * x[q];
        }
      }
      if (!std::is_same<O, float>::value || st) store_f32(d, obase[w.block] + w.start, len);
    }
#if defined(__AVX__)
    if (stream) _mm_sfence();
#endif
  }
}

void combine_f64(const std::vector<Tensor>& J, const std::vector<Tensor>& out, const std::vector<double>& c,
                 int64_t K, const std::vector<int64_t>& ns) {
  for (size_t b = 0; b < J.size(); ++b) {
    const double* x = J[b].data_ptr<double>();
    Tensor d = at::zeros({ns[b]}, J[b].options());
    double* dp = d.data_ptr<double>();
    for (int64_t k = 0; k < K; ++k)
      for (int64_t q = 0; q < ns[b]; ++q) dp[q] += c[k] * x[k * ns[b] + q];
    out[b].copy_(d);
  }
}

void combine_cpu(at::TensorList Jl, const Tensor& c, at::TensorList outl) {
  std::vector<Tensor> J(Jl.begin(), Jl.end()), out(outl.begin(), outl.end());
  int64_t K = 0;
  std::vector<int64_t> ns;
  check_blocks(J, K, ns);
  TORCH_CHECK(out.size() == J.size(), "out has ", out.size(), " tensors, J has ", J.size());
  TORCH_CHECK(c.numel() == K, "c must be [K = ", K, "]");
  for (size_t i = 0; i < out.size(); ++i) {
    TORCH_CHECK(out[i].device().is_cpu() && out[i].is_contiguous() && out[i].numel() == ns[i],
                "out[", i, "] must be a contiguous CPU tensor with ", ns[i], " elements");
    TORCH_CHECK(out[i].scalar_type() == out[0].scalar_type(), "all out tensors must share a dtype");
  }
  check_float_dtype(out[0], "out");
  const auto jt = J[0].scalar_type();
  const auto ot = out[0].scalar_type();
  if (jt == at::kDouble) {
    Tensor cd = c.to(at::kDouble).contiguous();
    std::vector<double> cv(cd.data_ptr<double>(), cd.data_ptr<double>() + K);
    return combine_f64(J, out, cv, K, ns);
  }
  Tensor cf = c.to(at::kFloat).contiguous();
  std::vector<float> cv(cf.data_ptr<float>(), cf.data_ptr<float>() + K);
#define APEX_OUT(T)                                                                              \
  switch (ot) {                                                                                  \
    case at::kFloat: return combine_impl<T, float>(J, out, cv, K, ns);                           \
    case at::kHalf: return combine_impl<T, c10::Half>(J, out, cv, K, ns);                        \
    case at::kBFloat16: return combine_impl<T, c10::BFloat16>(J, out, cv, K, ns);                \
    case at::kDouble: return combine_impl<T, double>(J, out, cv, K, ns);                         \
    default: TORCH_CHECK(false, "unsupported out dtype ", ot);                                   \
  }
  switch (jt) {
    case at::kFloat: APEX_OUT(float)
    case at::kHalf: APEX_OUT(c10::Half)
    case at::kBFloat16: APEX_OUT(c10::BFloat16)
    default: TORCH_CHECK(false, "unsupported J dtype ", jt);
  }
#undef APEX_OUT
}

// ------------------------------------------------------------------------------------------------
// weighted_grads: G[k] = delta^T diag(W[:, k]) a as ONE GEMM per row chunk. The smaller of
// (out, in) is scaled by the K weights into a [Mc, K * side] buffer (OpenMP), then one GEMM
// (MKL/OpenBLAS through at::addmm_) gives all K gradients at once.

template <typename T>
void scale_rows(const T* x, const float* W, float* dst, int64_t m0, int64_t Mc, int64_t side, int64_t K) {
#pragma omp parallel for schedule(static) if (Mc * K * side > (1 << 15))
  for (int64_t r = 0; r < Mc; ++r) {
    const T* xr = x + (m0 + r) * side;
    const float* wr = W + (m0 + r) * K;
    float* dr = dst + r * K * side;
    for (int64_t k = 0; k < K; ++k) {
      const float wk = wr[k];
#pragma omp simd
      for (int64_t q = 0; q < side; ++q) dr[k * side + q] = wk * to_f(xr[q]);
    }
  }
}

Tensor weighted_grads_cpu(const Tensor& delta, const Tensor& a, const Tensor& W) {
  TORCH_CHECK(delta.dim() == 2 && a.dim() == 2 && W.dim() == 2, "expected delta [M, out], a [M, in], W [M, K]");
  TORCH_CHECK(delta.size(0) == a.size(0) && a.size(0) == W.size(0), "delta, a, W must share M");
  TORCH_CHECK(delta.scalar_type() == a.scalar_type(), "delta and a must share a dtype");
  check_float_dtype(delta, "delta");
  check_float_dtype(W, "W");
  TORCH_CHECK(delta.is_contiguous() && a.is_contiguous() && W.is_contiguous(), "delta, a, W must be contiguous");
  const int64_t M = delta.size(0), O = delta.size(1), I = a.size(1), K = W.size(1);
  if (delta.scalar_type() == at::kDouble) {  // exact path, no hot use
    Tensor Wd = W.to(at::kDouble);
    Tensor D = (delta.unsqueeze(1) * Wd.unsqueeze(2)).reshape({M, K * O});
    return at::mm(D.t(), a).reshape({K, O, I});
  }
  auto fopt = delta.options().dtype(at::kFloat);
  Tensor Wf = W.to(at::kFloat).contiguous();
  const bool scale_delta = O <= I;
  const int64_t side = scale_delta ? O : I;
  const Tensor& scaled = scale_delta ? delta : a;
  const Tensor& other = scale_delta ? a : delta;
  Tensor otherf = other.scalar_type() == at::kFloat ? other : other.to(at::kFloat);
  // row chunk: keep the scaled buffer around 16 MB
  const int64_t Mc = std::max<int64_t>(256, std::min<int64_t>(M, (int64_t(4) << 20) / std::max<int64_t>(1, K * side)));
  Tensor buf = at::empty({std::min(Mc, std::max<int64_t>(M, 1)), K * side}, fopt);
  Tensor acc = at::zeros({K * side, scale_delta ? I : O}, fopt);  // [K*O, I] or [K*I, O]
  for (int64_t m0 = 0; m0 < M; m0 += Mc) {
    const int64_t mc = std::min(Mc, M - m0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scaled.scalar_type(), "apex_fast_scale", [&] {
      scale_rows(scaled.data_ptr<scalar_t>(), Wf.data_ptr<float>(), buf.data_ptr<float>(), m0, mc, side, K);
    });
    acc.addmm_(buf.narrow(0, 0, mc).t(), otherf.narrow(0, m0, mc));
  }
  Tensor G = scale_delta ? acc.view({K, O, I}) : acc.view({K, I, O}).transpose(1, 2).contiguous();
  return G.scalar_type() == delta.scalar_type() ? G : G.to(delta.scalar_type());
}

}  // namespace

TORCH_LIBRARY(apex_fast, m) {
  m.def("group_normalize(Tensor R, Tensor group_ids, bool global_std, float eps, Tensor? std_floor) -> Tensor");
  m.def("dual_stage_advantages(Tensor R, Tensor group_ids, Tensor weights, Tensor? std_floor, float eps, "
        "float clip) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("gram(Tensor[] J) -> Tensor");
  m.def("combine(Tensor[] J, Tensor c, Tensor(a!)[] out) -> ()");
  m.def("weighted_grads(Tensor delta, Tensor a, Tensor W) -> Tensor");
}

TORCH_LIBRARY_IMPL(apex_fast, CPU, m) {
  m.impl("group_normalize", &group_normalize_cpu);
  m.impl("dual_stage_advantages", &dual_stage_cpu);
  m.impl("gram", &gram_cpu);
  m.impl("combine", &combine_cpu);
  m.impl("weighted_grads", &weighted_grads_cpu);
}

}  // namespace apex_fast

// `import apex_fast._C` loads the library (and with it the registrations above)
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "apex_fast C++/CUDA ops (torch.ops.apex_fast)",
                                   -1, nullptr};
  return PyModule_Create(&def);
}
