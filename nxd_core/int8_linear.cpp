// y = (x W^T) * scale for int8 W [N, K] with one fp32 scale per output row, x [M, K] bfloat16 or
// float32 (a few rows): weight-only int8 for decoding.
//
// Why: decoding reads every weight once per token, so its speed is memory bandwidth; int8 weights
// are half the bytes of bf16. Activations stay floating point: each weight byte is widened to fp32
// (sign-extend, convert) and meets x in an FMA, accumulated in fp32, scaled and rounded once.
//
// Two SIMD paths in one object: AVX2+FMA (the file's baseline flags) and AVX-512 (function-level
// target attributes), chosen at run time from the CPU, never assumed. NXD_INT8_KERNEL=avx2 forces
// the AVX2 path (read once per process) so it can be tested on an AVX-512 machine.
//
// Threads take chunks of 64 rows from a shared counter (split_rows), never split K.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

static inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- AVX2 + FMA: 8 lanes ----------------------------------------------------------------------

static inline __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// NR weight rows (K apart) against MR rows of x (K apart): each 8 weights are widened once and
// used MR times, each x vector loaded once and used NR times. U vectors per step give NR*MR*U
// independent accumulators: enough to cover FMA latency, within the 16 ymm registers.
// out[r * MR + m] = row r . x row m.
template <int NR, int MR, int U>
static inline void dot_avx2(const int8_t* w, int64_t K, const float* x, float* out) {
  __m256 acc[NR][MR][U];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) {
      __m256 wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = load_i8x8(w + r * K + k + 8 * u);
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k + 8 * u);
        for (int r = 0; r < NR; ++r) acc[r][m][u] = _mm256_fmadd_ps(wv[r], xv, acc[r][m][u]);
      }
    }
  for (; k + 8 <= K; k += 8)
    for (int r = 0; r < NR; ++r) {
      const __m256 wv = load_i8x8(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[r][m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * K + k), acc[r][m][0]);
    }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      for (int u = 1; u < U; ++u) acc[r][m][0] = _mm256_add_ps(acc[r][m][0], acc[r][m][u]);
      float s = hsum8(acc[r][m][0]);
      for (int64_t j = k; j < K; ++j) s += float(w[r * K + j]) * x[m * K + j];
      out[r * MR + m] = s;
    }
}

// ---- AVX-512F/BW: 16 lanes ----------------------------------------------------------------------

#define NXD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

NXD_AVX512 static inline __m512 load_i8x16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// As dot_avx2, 16 lanes, 32 zmm registers. Not inlined into the (AVX2) driver: one call per tile
// of whole rows, so the call costs nothing next to the K loop.
template <int NR, int MR, int U>
NXD_AVX512 static void dot_avx512(const int8_t* w, int64_t K, const float* x, float* out) {
  __m512 acc[NR][MR][U];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = load_i8x16(w + r * K + k + 16 * u);
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * u);
        for (int r = 0; r < NR; ++r) acc[r][m][u] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][u]);
      }
    }
  for (; k + 16 <= K; k += 16)
    for (int r = 0; r < NR; ++r) {
      const __m512 wv = load_i8x16(w + r * K + k);
      for (int m = 0; m < MR; ++m) acc[r][m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * K + k), acc[r][m][0]);
    }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) {
      for (int u = 1; u < U; ++u) acc[r][m][0] = _mm512_add_ps(acc[r][m][0], acc[r][m][u]);
      float s = _mm512_reduce_add_ps(acc[r][m][0]);
      for (int64_t j = k; j < K; ++j) s += float(w[r * K + j]) * x[m * K + j];
      out[r * MR + m] = s;
    }
}

// ---- driver -----------------------------------------------------------------------------------

enum Isa { kAvx2 = 0, kAvx512 = 1 };

static Isa chosen_isa() {
  static const Isa isa = [] {
    const char* forced = std::getenv("NXD_INT8_KERNEL");
    if (forced && std::string(forced) == "avx2") return kAvx2;
    // __builtin_cpu_supports also checks that the OS saves the AVX-512 registers.
    return (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) ? kAvx512 : kAvx2;
  }();
  return isa;
}

template <bool AVX512, int NR, int MR, int U>
static inline void tile(const int8_t* w, int64_t K, const float* x, int64_t m, int64_t n, int64_t nb, float* acc) {
  float part[NR * MR];
  if constexpr (AVX512) dot_avx512<NR, MR, U>(w + n * K, K, x + m * K, part);
  else dot_avx2<NR, MR, U>(w + n * K, K, x + m * K, part);
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[(m + i) * nb + n + r] = part[r * MR + i];
}

// NR weight rows at a time against all M rows of x, MR at a time, while those rows sit in L1.
template <bool AVX512, int NR>
static void rows_tiles(const int8_t* w, int64_t K, const float* x, int64_t M, int64_t n, int64_t nb, float* acc) {
  constexpr int kMaxMR = AVX512 ? 8 : 4;
  int64_t m = 0;
  for (; m + kMaxMR <= M; m += kMaxMR) tile<AVX512, NR, kMaxMR, 1>(w, K, x, m, n, nb, acc);
  if (kMaxMR > 4 && M - m >= 4) tile<AVX512, NR, 4, 1>(w, K, x, m, n, nb, acc), m += 4;
  if (M - m >= 2) tile<AVX512, NR, 2, 2>(w, K, x, m, n, nb, acc), m += 2;
  if (M - m == 1) tile<AVX512, NR, 1, 4>(w, K, x, m, n, nb, acc);
}

// Rows [0, nb) of W (already offset) against all M rows of x into acc[M][nb].
template <bool AVX512>
static void rows_range(const int8_t* w, int64_t K, const float* x, int64_t M, int64_t nb, float* acc) {
  if (M == 1) {
    // One row of x: one weight stream at a time, 32 bytes of W per step (AVX2: 4 vectors,
    // AVX-512: 2; measured on Zen 4, 64 bytes per step or two rows at once read memory slower).
    for (int64_t n = 0; n < nb; ++n) tile<AVX512, 1, 1, AVX512 ? 2 : 4>(w, K, x, 0, n, nb, acc);
    return;
  }
  // Several rows of x: two weight rows per tile halve the loads of x (which is in L2 once
  // M * K * 4 bytes outgrow L1).
  int64_t n = 0;
  for (; n + 2 <= nb; n += 2) rows_tiles<AVX512, 2>(w, K, x, M, n, nb, acc);
  if (n < nb) rows_tiles<AVX512, 1>(w, K, x, M, n, nb, acc);
}

// f(begin, end) over chunks of `chunk` rows of [0, N): at most one thread per chunk (at::get_num_threads()
// of them), each taking the next chunk from a shared counter until none is left (as llama.cpp does):
// on a shared machine one thread often starts or runs late, and a fixed share each would wait for it.
template <typename F>
static void split_rows(int64_t N, int64_t chunk, const F& f) {
  const int64_t chunks = (N + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) return f(0, N);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) f(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && x_in.size(1) == w.size(1), "int8_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, "int8_linear: x bfloat16 or float32");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_linear: w int8, contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == w.size(0), "int8_linear: scale float32 [N]");
  const at::Tensor xc = x_in.contiguous();
  const at::Tensor sc = scale.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  // x widened to fp32 once (a few KB per row), in a tensor: 64-byte aligned, so no 64-byte load
  // of x straddles two cache lines. fp32 x is used in place.
  at::Tensor xw = bf16 ? at::empty({M, K}, xc.options().dtype(at::kFloat)) : xc;
  if (bf16) {
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    float* xd = xw.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) xd[i] = bf16_to_float(xs[i]);
  }
  const float* x = xw.data_ptr<float>();
  at::Tensor out = at::empty({M, N}, xc.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  const bool avx512 = chosen_isa() == kAvx512;
  split_rows(N, 64, [&](int64_t begin, int64_t end) {  // chunks of 64 rows: whole blocks
    // Blocks of rows so the fp32 sums for all M rows stay on the stack, then scale and round once.
    constexpr int64_t kBlock = 64;
    float acc[16 * kBlock];
    const int64_t mb = 16;
    // More than 16 rows of x: the next 16 meet the same block of W again, now in L2.
    for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const int64_t n1 = std::min(end, n0 + kBlock), nb = n1 - n0;
      for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t mc = std::min(mb, M - m0);
        if (avx512) rows_range<true>(wp + n0 * K, K, x + m0 * K, mc, nb, acc);
        else rows_range<false>(wp + n0 * K, K, x + m0 * K, mc, nb, acc);
        for (int64_t m = 0; m < mc; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            const float v = acc[m * nb + n - n0] * sp[n];
            if (bf16) ob[(m0 + m) * N + n] = float_to_bf16(v);
            else of[(m0 + m) * N + n] = v;
          }
      }
    }
  });
  return out;
}

std::string int8_linear_isa() { return chosen_isa() == kAvx512 ? "avx512" : "avx2"; }

// Registered with the dispatcher (not pybind): a call costs what any aten op costs. A fragment of
// the nxd namespace, which bf16_linear.cpp defines.
TORCH_LIBRARY_FRAGMENT(nxd, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_linear_isa() -> str", &int8_linear_isa);
}
TORCH_LIBRARY_IMPL(nxd, CPU, m) { m.impl("int8_linear", &int8_linear); }
