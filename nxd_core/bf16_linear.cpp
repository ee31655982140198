// y = x W^T for bfloat16 x [M, K] (a few rows) and W [N, K] on CPUs with AVX2 and FMA.
//
// Why: decoding multiplies one token's activations by every weight matrix. ATen's bfloat16
// matrix-vector product on AVX2 (no native bf16 instructions) runs well below what the core can
// do; widening bf16 to fp32 is a shift, so plain FMA loops are up to 2x faster. Accumulates in
// fp32 and rounds once, like ATen's bf16 GEMM.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

static inline __m256 load_bf16x8(const uint16_t* p) {
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One row, four independent accumulators along k. Rows longer than a few thousand (x no longer
// stays in L1 beside them) are left to ATen, which blocks them better: see cpu_kernels.MAX_K.
static inline float dot_row(const uint16_t* row, int64_t K, const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    a0 = _mm256_fmadd_ps(load_bf16x8(row + k), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(load_bf16x8(row + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    a2 = _mm256_fmadd_ps(load_bf16x8(row + k + 16), _mm256_loadu_ps(x + k + 16), a2);
    a3 = _mm256_fmadd_ps(load_bf16x8(row + k + 24), _mm256_loadu_ps(x + k + 24), a3);
  }
  for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load_bf16x8(row + k), _mm256_loadu_ps(x + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < K; ++k) s += bf16_to_float(row[k]) * x[k];
  return s;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

at::Tensor bf16_linear(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "bf16_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "bf16_linear: bfloat16 tensors, w contiguous");
  const at::Tensor xb = x_in.contiguous();
  const int64_t M = xb.size(0), K = xb.size(1), N = w.size(0);
  // x widened to fp32 once (a few KB), then every weight row meets it in the FMA loop.
  std::vector<float> x(M * K);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  for (int64_t i = 0; i < M * K; ++i) x[i] = bf16_to_float(xs[i]);
  at::Tensor out = at::empty({M, N}, xb.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = begin; n < end; ++n) op[m * N + n] = float_to_bf16(dot_row(wp + n * K, K, x.data() + m * K));
  });
  return out;
}

// Registered with the dispatcher (not pybind): a call costs what any aten op costs.
TORCH_LIBRARY(nxd, m) { m.def("bf16_linear(Tensor x, Tensor w) -> Tensor"); }
TORCH_LIBRARY_IMPL(nxd, CPU, m) { m.impl("bf16_linear", &bf16_linear); }
