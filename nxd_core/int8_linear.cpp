// y = (x W^T) * scale for int8 W [N, K] with one fp32 scale per output row, x [M, K] bfloat16 or
// float32 (a few rows): weight-only int8 for decoding.
//
// Why: decoding reads every weight once per token, so its speed is memory bandwidth; int8 weights
// are half the bytes of bf16. Activations are not quantized to int8: the fp32 paths widen each weight
// byte to fp32 for an FMA with x; the VNNI path multiplies the bytes by x held (nearly) exactly as a
// 22-bit integer. Either way the sums are scaled and rounded once.
//
// Three SIMD paths in one object, chosen at run time from the CPU, never assumed:
//   avx2        AVX2+FMA (the file's baseline flags): bytes widened to fp32, 8-lane FMAs
//   avx512      AVX-512F/BW/VL (function-level target attributes): the same with 16 lanes
//   avx512vnni  AVX512_VNNI, bf16 x only: x as three signed bytes (a 22-bit integer) with a
//               power-of-two scale per 256 inputs, weights made unsigned, vpdpbusd (accuracy: see
//               the section); fp32 x, or x holding a NaN or an infinity, takes the avx512 path
// NXD_INT8_KERNEL=avx2 or avx512 (read once per process) lowers the path, so each can be tested on
// one machine.
//
// Threads take chunks of 64 rows, their own share first, then others' leftovers (split_parts); never split K.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_common.h"
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>


// ---- AVX2 + FMA: 8 lanes ----------------------------------------------------------------------

static inline __m256 load_i8x8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
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

// ---- AVX512_VNNI: bf16 x as three signed bytes per input, vpdpbusd ------------------------------
//
// Why: the fp32 paths spend 3 instructions on every 16 weights (sign-extend, convert, FMA) and top
// out near 21-25 G weights/s per core with W in L2 (Zen 4), about what memory delivers to one core,
// so two threads are compute-bound. Here x is turned once per call into integers (quantize_x), and
// vpdpbusd multiplies 64 weight bytes as they are loaded (made unsigned by one XOR) by 64 bytes of x
// into 16 int32 lanes: per 64 weights 1 load, 1 XOR and 3 dot products (x's three bytes), then per
// block of 256 and byte one convert and one FMA into fp32. Two weight rows share each load of x;
// they are half a block of rows apart, so that each streams through its own pages (two adjacent
// rows share a 4 KB page and read memory ~30% slower on Zen 4). One core, W in L2, G weights/s:
// [256, 2048] 34.0 against 29.5 for the vpdpwssd version this replaced (x as two int16 parts,
// weights sign-extended to int16), [96, 5632] 30.5 against 27.4; the 1.1B layout's int8 pass from
// memory on one thread 24.7 against 23.2 GB/s (the two kernels alternating in one process, best of 10).
//
// Accuracy: per block of 256 inputs x = X * 2^-s with X = H * 2^16 + Mi * 2^8 + L, each byte in
// [-128, 127], and the block's largest |x| * 2^s in [2^21, 2^22). bf16 has 8 significant bits, so X
// holds every input within 2^14 of the largest exactly; a smaller one is off by at most 2^-22 of the
// largest (fp32's own rounding is 2^-24). vpdpbusd sums (w + 128) * byte; each part's chain starts
// from -128 times that part's sum over the block, so the block's int32 sum is exactly sum w * byte
// (at most 4 * 4 * 255 * 128 per lane). Each block's three sums become fp32 once each, the same way
// for every row of x and either weight row of a pair (row invariance). Only bf16 x takes this path,
// and only finite x (a NaN or an infinity anywhere sends the call to the fp32 path, which propagates it).

#define NXD_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))

constexpr int64_t kQBlock = 256;  // inputs per scale of x

// Rows longer than a page (K > 4096) prefetch the weights 4 KB ahead into L2, as int4_linear.cpp
// does. Measured on one Zen 4 core (machine shared, best of 15 passes over 256 MB of copies, GB/s):
// W [2048, 5632] 11.2-12.2 without, 15.8-16.4 with; W [2048, 2048] and [5632, 2048] (2 KB rows)
// 16.6-20.5 without, 14.5-17.5 with, so shorter rows leave it to the hardware prefetcher.
constexpr int64_t kPrefetch = 4096;

// bf16 x [M, K] -> int8 parts xq [M][3][Kp] (H, Mi, L: X = H * 2^16 + Mi * 2^8 + L, zero-padded to
// whole blocks), per block the value of one unit of X (xs [M, Kb]) and -128 times each part's sum
// (corr [M][Kb][3]); false where x holds a NaN or an infinity.
NXD_AVX512VNNI static bool quantize_x(const uint16_t* x, int64_t M, int64_t K, int8_t* xq, float* xs, int32_t* corr) {
  const int64_t Kp = (K + kQBlock - 1) / kQBlock * kQBlock, Kb = Kp / kQBlock;
  const __m512i b128 = _mm512_set1_epi32(128), b255 = _mm512_set1_epi32(255);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < Kb; ++b) {
      const int64_t k0 = b * kQBlock;
      __m512 v[kQBlock / 16];
      __m512 mx = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int j = 0; j < kQBlock / 16; ++j) {
        const int64_t k = k0 + 16 * j, left = std::max<int64_t>(0, std::min<int64_t>(16, K - k));
        const __mmask16 mask = left == 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
        const __m256i h = _mm256_maskz_loadu_epi16(mask, x + m * K + k);
        bad |= _mm256_cmpge_epu16_mask(_mm256_and_si256(h, _mm256_set1_epi16(0x7fff)), _mm256_set1_epi16(0x7f80));
        v[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v[j]));
      }
      if (bad) return false;
      int e = 0;
      std::frexp(_mm512_reduce_max_ps(mx), &e);  // largest < 2^e (e = 0 for a block of zeros)
      // largest * 2^shift in [2^21, 2^22): |H| <= 65. 2^-shift stays a normal float except for
      // blocks below 2^-104 (there the smallest bits are lost: gradual underflow).
      const int shift = std::min(22 - e, 126);
      xs[m * Kb + b] = std::ldexp(1.0f, -shift);
      // 2^shift in two steps (shift may exceed 127, the largest power of two in a float)
      const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, std::min(shift, 100))), up2 = _mm512_set1_ps(std::ldexp(1.0f, shift - std::min(shift, 100)));
      __m512i sums[3] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
      int8_t* dst = xq + m * 3 * Kp + k0;
      for (int j = 0; j < kQBlock / 16; ++j) {
        const __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(v[j], up), up2));  // |X| <= 2^22, exact but for the rounding
        // balanced base-256 digits, each in [-128, 127]
        const __m512i L = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, b128), b255), b128);
        const __m512i T = _mm512_srai_epi32(_mm512_sub_epi32(X, L), 8);
        const __m512i Mi = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(T, b128), b255), b128);
        const __m512i H = _mm512_srai_epi32(_mm512_sub_epi32(T, Mi), 8);
        const __m512i parts[3] = {H, Mi, L};
        for (int p = 0; p < 3; ++p) {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + p * Kp + 16 * j), _mm512_cvtepi32_epi8(parts[p]));
          sums[p] = _mm512_add_epi32(sums[p], parts[p]);
        }
      }
      for (int p = 0; p < 3; ++p) corr[(m * Kb + b) * 3 + p] = -128 * _mm512_reduce_add_epi32(sums[p]);
    }
  return true;
}

// NR weight rows (K apart) against MR rows of xq: vpdpbusd multiplies the weights made unsigned
// (w + 128, an XOR of the sign bit) by each signed part of x, 64 products per instruction summed in
// int32; each part's chain starts from -128 times the part's sum, so a block's int32 result is
// exactly sum w * part. Each x load serves NR rows. Each block's three sums become fp32 once and
// meet their scales in FMAs. out[r * MR + m].
template <int NR, int MR>
NXD_AVX512VNNI static void dot_vnni(const int8_t* w, int64_t K, int64_t rs, const int8_t* xq, int64_t Kp, const float* xs, const int32_t* corr, float* out) {
  const int64_t Kb = Kp / kQBlock;
  const __m512i sign = _mm512_set1_epi8(char(0x80));
  __m512 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < Kb; ++b) {
    const int64_t k0 = b * kQBlock;
    __m512i acc[NR][MR][3];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m)
        for (int p = 0; p < 3; ++p) acc[r][m][p] = _mm512_maskz_set1_epi32(1, corr[(m * Kb + b) * 3 + p]);
    if (K > kPrefetch)
      for (int r = 0; r < NR; ++r)
        for (int j = 0; j < kQBlock / 64; ++j) _mm_prefetch(reinterpret_cast<const char*>(w + r * rs + k0 + 64 * j + kPrefetch), _MM_HINT_T1);
    const bool whole = k0 + kQBlock <= K;
    for (int j = 0; j < kQBlock / 64; ++j) {
      const int64_t k = k0 + 64 * j;
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(64, K - k));
      const __mmask64 mask = whole || left == 64 ? ~__mmask64(0) : (__mmask64(1) << left) - 1;  // weights beyond K read as 0
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_xor_si512(whole ? _mm512_loadu_si512(w + r * rs + k) : _mm512_maskz_loadu_epi8(mask, w + r * rs + k), sign);
      for (int m = 0; m < MR; ++m)
        for (int p = 0; p < 3; ++p) {
          const __m512i xv = _mm512_loadu_si512(xq + m * 3 * Kp + p * Kp + k);
          for (int r = 0; r < NR; ++r) acc[r][m][p] = _mm512_dpbusd_epi32(acc[r][m][p], wv[r], xv);
        }
    }
    for (int m = 0; m < MR; ++m) {
      const float scale = xs[m * Kb + b];
      for (int p = 0; p < 3; ++p) {
        const __m512 sv = _mm512_set1_ps(scale * float(1 << (8 * (2 - p))));
        for (int r = 0; r < NR; ++r) tot[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][m][p]), sv, tot[r][m]);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = _mm512_reduce_add_ps(tot[r][m]);
}

template <int NR, int MR>
NXD_AVX512VNNI static inline void tile_vnni(const int8_t* w, int64_t K, const int8_t* xq, int64_t Kp, const float* xs, const int32_t* corr,
                                            int64_t m, int64_t n, int64_t nb, float* acc, int64_t apart = 1) {
  const int64_t Kb = Kp / kQBlock;
  float part[NR * MR];
  dot_vnni<NR, MR>(w + n * K, K, apart * K, xq + m * 3 * Kp, Kp, xs + m * Kb, corr + m * Kb * 3, part);
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[(m + i) * nb + n + r * apart] = part[r * MR + i];
}

// Rows [0, nb) of W (already offset) against M rows of xq into acc[M][nb]: two weight rows and up
// to two rows of x at a time (12 int32 chains).
NXD_AVX512VNNI static void rows_range_vnni(const int8_t* w, int64_t K, const int8_t* xq, int64_t Kp, const float* xs, const int32_t* corr,
                                          int64_t M, int64_t nb, float* acc) {
  // row n with row n + half: two streams, each through its own pages
  const int64_t half = nb / 2;
  for (int64_t n = 0; n < half; ++n) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_vnni<2, 2>(w, K, xq, Kp, xs, corr, m, n, nb, acc, half);
    if (m < M) tile_vnni<2, 1>(w, K, xq, Kp, xs, corr, m, n, nb, acc, half);
  }
  for (int64_t n = 2 * half; n < nb; ++n) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_vnni<1, 2>(w, K, xq, Kp, xs, corr, m, n, nb, acc);
    if (m < M) tile_vnni<1, 1>(w, K, xq, Kp, xs, corr, m, n, nb, acc);
  }
}

// ---- driver -----------------------------------------------------------------------------------

enum Isa { kAvx2 = 0, kAvx512 = 1, kAvx512Vnni = 2 };
static const char* const kIsaNames[] = {"avx2", "avx512", "avx512vnni"};

static Isa chosen_isa() {
  static const Isa isa = [] {
    // __builtin_cpu_supports also checks that the OS saves the AVX-512 registers.
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    const Isa best = !avx512 ? kAvx2 : __builtin_cpu_supports("avx512vnni") ? kAvx512Vnni : kAvx512;
    const char* forced = std::getenv("NXD_INT8_KERNEL");
    if (forced && std::string(forced) == "avx2") return kAvx2;
    if (forced && std::string(forced) == "avx512" && best >= kAvx512) return kAvx512;
    return best;
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

// x [M, K] against the int8 weights ws[0..P) (each [N_p, K], scales [N_p]) into out [M, sum N_p]:
// part p's outputs are columns [offset_p, offset_p + N_p). One call for q, k and v (or gate and up)
// pays the fixed costs once: the threads' start and finish, and x's preparation.
static at::Tensor linear_parts(const at::Tensor& x_in, at::TensorList ws, at::TensorList scales) {
  TORCH_CHECK(!ws.empty() && ws.size() == scales.size(), "int8_linear: as many scales as weights, at least one");
  TORCH_CHECK(x_in.dim() == 2, "int8_linear: x [M, K] and w [N, K]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, "int8_linear: x bfloat16 or float32");
  const at::Tensor xc = x_in.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  std::vector<int64_t> rows, offset;
  std::vector<const int8_t*> wps;
  std::vector<at::Tensor> scs;
  int64_t total = 0;
  for (size_t p = 0; p < ws.size(); ++p) {
    const at::Tensor& w = ws[p];
    const at::Tensor& scale = scales[p];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "int8_linear: x [M, K] and w [N, K]");
    TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous(), "int8_linear: w int8, contiguous");
    TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == w.size(0), "int8_linear: scale float32 [N]");
    rows.push_back(w.size(0));
    offset.push_back(total);
    total += w.size(0);
    wps.push_back(w.data_ptr<int8_t>());
    scs.push_back(scale.contiguous());
  }
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  // bf16 x on AVX512_VNNI: three signed bytes per input, a scale per block (quantize_x); a NaN or
  // infinity in x keeps the fp32 path.
  const int64_t Kp = (K + kQBlock - 1) / kQBlock * kQBlock;
  at::Tensor xq, xqs, xqc;
  bool vnni = false;
  if (bf16 && chosen_isa() == kAvx512Vnni) {
    xq = at::empty({M, 3, Kp}, xc.options().dtype(at::kChar));
    xqs = at::empty({M, Kp / kQBlock}, xc.options().dtype(at::kFloat));
    xqc = at::empty({M, Kp / kQBlock, 3}, xc.options().dtype(at::kInt));
    vnni = quantize_x(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K, xq.data_ptr<int8_t>(), xqs.data_ptr<float>(),
                      xqc.data_ptr<int32_t>());
  }
  const int8_t* xqp = vnni ? xq.data_ptr<int8_t>() : nullptr;
  const float* xqsp = vnni ? xqs.data_ptr<float>() : nullptr;
  const int32_t* xqcp = vnni ? xqc.data_ptr<int32_t>() : nullptr;
  // Otherwise x widened to fp32 once (a few KB per row), in a tensor: 64-byte aligned, so no 64-byte
  // load of x straddles two cache lines. fp32 x is used in place.
  at::Tensor xw = bf16 && !vnni ? at::empty({M, K}, xc.options().dtype(at::kFloat)) : xc;
  if (bf16 && !vnni) {
    const uint16_t* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    float* xd = xw.data_ptr<float>();
    for (int64_t i = 0; i < M * K; ++i) xd[i] = bf16_to_float(xs[i]);
  }
  const float* x = vnni ? nullptr : xw.data_ptr<float>();
  at::Tensor out = at::empty({M, total}, xc.options());
  if (M == 0 || total == 0) return out;
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  const bool avx512 = chosen_isa() >= kAvx512;
  split_parts(rows, 64, [&](int64_t p, int64_t begin, int64_t end) {  // chunks of 64 rows: whole blocks
    const int8_t* wp = wps[p];
    const float* sp = scs[p].data_ptr<float>();
    // Blocks of rows so the fp32 sums for all M rows stay on the stack, then scale and round once.
    constexpr int64_t kBlock = 64;
    float acc[16 * kBlock];
    const int64_t mb = 16;
    // More than 16 rows of x: the next 16 meet the same block of W again, now in L2.
    for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const int64_t n1 = std::min(end, n0 + kBlock), nb = n1 - n0;
      for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t mc = std::min(mb, M - m0);
        if (vnni) rows_range_vnni(wp + n0 * K, K, xqp + m0 * 3 * Kp, Kp, xqsp + m0 * (Kp / kQBlock), xqcp + m0 * (Kp / kQBlock) * 3, mc, nb, acc);
        else if (avx512) rows_range<true>(wp + n0 * K, K, x + m0 * K, mc, nb, acc);
        else rows_range<false>(wp + n0 * K, K, x + m0 * K, mc, nb, acc);
        for (int64_t m = 0; m < mc; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            const float v = acc[m * nb + n - n0] * sp[n];
            const int64_t at = (m0 + m) * total + offset[p] + n;
            if (bf16) ob[at] = float_to_bf16(v);
            else of[at] = v;
          }
      }
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) { return linear_parts(x, {w}, {scale}); }

// x [M, K] against several int8 weights at once: [M, sum of their rows], each weight's outputs in turn.
at::Tensor int8_linear_many(const at::Tensor& x, at::TensorList ws, at::TensorList scales) { return linear_parts(x, ws, scales); }

std::string int8_linear_isa() { return kIsaNames[chosen_isa()]; }

// Registered with the dispatcher (not pybind): a call costs what any aten op costs. A fragment of
// the nxd namespace, which bf16_linear.cpp defines.
TORCH_LIBRARY_FRAGMENT(nxd, m) {
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_linear_many(Tensor x, Tensor[] ws, Tensor[] scales) -> Tensor");
  m.def("int8_linear_isa() -> str", &int8_linear_isa);
}
TORCH_LIBRARY_IMPL(nxd, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int8_linear_many", &int8_linear_many);
}
