// y = x W^T for int4 W [N, K] with one bfloat16 scale per group of G inputs, x [M, K] bfloat16 or
// float32 (a few rows): weight-only int4 for decoding.
//
// Why: decoding reads every weight once per token, so its speed is memory bandwidth; int4 weights
// are a quarter of the bytes of bf16 (plus 2 bytes of scale per group). Activations stay floating
// point: on the fp32 paths each nibble becomes q - 8, is widened to fp32 and meets x in an FMA (the
// BF16 path: see dot_bf16); each group's fp32 sum is multiplied by its scale into the row's fp32
// total, rounded once.
//
// The format (nxd_core.quantization.quantize_int4): q + 8 in a nibble, two per byte, the low nibble
// the even input k, the high nibble k + 1. x is permuted once per call into that order (in each
// block of 32 inputs of a group: the 16 even inputs, then the 16 odd ones), so the weight side needs
// no shuffles. A group's last G % 32 inputs (G not a multiple of 32) stay in order, done in scalar.
//
// Three SIMD paths in one object: AVX2+FMA (the file's baseline flags), AVX-512 and AVX-512 BF16
// (function-level target attributes), chosen at run time from the CPU, never assumed. The BF16 path
// (dot_bf16: nibbles to bf16 by table lookup, vdpbf16ps) takes bf16 x with a group that is a
// multiple of 8 dividing, or a multiple of, 128; other calls take the fp32 AVX-512 path there.
// NXD_INT4_KERNEL=avx2 or avx512 (read once per process) lowers the path, so each can be tested on
// one machine.
//
// Threads take chunks of 64 rows, their own share first, then others' leftovers (split_parts); never split K.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_common.h"
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>


// 16 bytes (32 inputs) as q - 8 in int8: lo the 16 even inputs, hi the 16 odd ones, in order.
static inline void split_nibbles(const uint8_t* p, __m128i& lo, __m128i& hi) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0f), eight = _mm_set1_epi8(8);
  lo = _mm_sub_epi8(_mm_and_si128(b, mask), eight);
  hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), mask), eight);
}

// The last G % 32 inputs of each group (kept in order, k even), scalar: out[r * MR + m] += their
// scaled sums. Only for a G that is not a multiple of 32, so it stays out of the SIMD loops.
template <int NR, int MR>
static void tails(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, const float* x, float* out) {
  const int64_t KB = K / 2, ng = K / G, full = G / 32 * 32;
  for (int r = 0; r < NR; ++r)
    for (int64_t j = 0; j < ng; ++j) {
      float part[MR] = {};
      for (int64_t k = j * G + full; k < (j + 1) * G; ++k) {
        const uint8_t b = w[r * KB + k / 2];
        const float q = float(int((k & 1) ? (b >> 4) : (b & 15)) - 8);
        for (int m = 0; m < MR; ++m) part[m] += q * x[m * K + k];
      }
      const float sc = bf16_to_float(s[r * ng + j]);
      for (int m = 0; m < MR; ++m) out[r * MR + m] += sc * part[m];
    }
}

// Software prefetch of the weight stream, this many bytes ahead, into L2: the hardware prefetcher
// alone kept one core near 7 GB/s here, against ~20 GB/s with it (Zen 4; 2-6 KB ahead did best,
// T0 and NTA did worse). Rows are contiguous, so past a row's end this is the next rows' start.
static constexpr int64_t kPrefetch = 4096;

// ---- AVX2 + FMA: 8 lanes ----------------------------------------------------------------------

// NR weight rows (K/2 bytes apart, scales ng apart) against MR rows of permuted x (K apart): each
// 8 weights are widened once and used MR times, each x vector loaded once and used NR times. A
// group's sum meets its scale in one FMA into the row's total; sums and totals stay in registers
// (NR * MR each). The full 32-input blocks of each group; out[r * MR + m] = row r . x row m.
template <int NR, int MR>
static inline void dot_avx2(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, const float* x, float* out) {
  const int64_t KB = K / 2, ng = K / G, full = G / 32 * 32;
  __m256 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_setzero_ps();
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t k0 = j * G;
    __m256 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + full; k += 32) {
      __m128i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) split_nibbles(w + r * KB + k / 2, lo[r], hi[r]);
      // x's block is even 0-7, even 8-15, odd 0-7, odd 8-15: the four 8-byte halves of lo, hi.
      for (int u = 0; u < 4; ++u) {
        __m256 wv[NR];
        for (int r = 0; r < NR; ++r) {
          __m128i b = u < 2 ? lo[r] : hi[r];
          if (u & 1) b = _mm_srli_si128(b, 8);
          wv[r] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
        }
        for (int m = 0; m < MR; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + k + 8 * u);
          for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256 sv = _mm256_set1_ps(bf16_to_float(s[r * ng + j]));
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = hsum8(tot[r][m]);
}

// The word-lane layout (K a multiple of 8 * lanes, and a group a multiple of 8 that divides or is
// divided by that block): lane l of a block's 32-bit words holds inputs 8l .. 8l + 7, nibble i
// being (word >> 4i) & 15, so widening is a shift and a mask, no shuffles; (v | 0x4b000000) is the
// float 2^23 + v, minus 2^23 + 8 exactly q. x is permuted to [i][lane] per block to match. A lane
// lies in one group, so each block's sums meet a vector of per-lane scales.
static constexpr float kMagic = 8388616.0f;  // 2^23 + 8

template <int NR, int MR>
static inline void dot_words_avx2(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, const float* x, float* out) {
  const int64_t KB = K / 2, ng = K / G;
  const int per = G < 64 ? int(64 / G) : 1;  // scales per block of 64 inputs
  alignas(32) int32_t lane_group[8];
  for (int l = 0; l < 8; ++l) lane_group[l] = G < 64 ? int32_t(8 * l / G) : 0;
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_group));
  const __m256i mask = _mm256_set1_epi32(15), bias = _mm256_set1_epi32(0x4b000000);
  const __m256 magic = _mm256_set1_ps(kMagic);
  __m256 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    __m256i D[NR];
    for (int r = 0; r < NR; ++r) D[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * KB + k / 2));
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * KB + k / 2 + kPrefetch), _MM_HINT_T1);
    __m256 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm256_setzero_ps();
    for (int i = 0; i < 8; ++i) {
      __m256 wv[NR];
      for (int r = 0; r < NR; ++r) {
        const __m256i v = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(D[r], 4 * i), mask), bias);
        wv[r] = _mm256_sub_ps(_mm256_castsi256_ps(v), magic);
      }
      for (int m = 0; m < MR; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * K + k + 8 * i);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      // The block's 1, 2, 4 or 8 scales in one load of just their bytes (scalar stores and a vector
      // load of them would stall on store forwarding), widened and spread to lanes.
      const uint16_t* sp = s + r * ng + k / G;
      const __m128i raw = per == 1 ? _mm_cvtsi32_si128(*sp) : per == 2 ? _mm_loadu_si32(sp) : per == 4 ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sp)) : _mm_loadu_si128(reinterpret_cast<const __m128i*>(sp));
      const __m256 sv = _mm256_permutevar8x32_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)), idx);
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm256_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = hsum8(tot[r][m]);
}

// ---- AVX-512F/BW: 16 lanes ----------------------------------------------------------------------

#define NXD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// As dot_avx2, 16 lanes: lo and hi widen to one zmm each, into two sums per group (half the FMA
// chain; 32 zmm registers). Not inlined into the (AVX2) driver: one call per tile of whole rows,
// so the call costs nothing next to the K loop.
template <int NR, int MR>
NXD_AVX512 static void dot_avx512(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, const float* x, float* out) {
  const int64_t KB = K / 2, ng = K / G, full = G / 32 * 32;
  __m512 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < ng; ++j) {
    const int64_t k0 = j * G;
    __m512 acc[NR][MR][2];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m][0] = acc[r][m][1] = _mm512_setzero_ps();
    for (int64_t k = k0; k < k0 + full; k += 32) {
      __m128i lo[NR], hi[NR];
      for (int r = 0; r < NR; ++r) split_nibbles(w + r * KB + k / 2, lo[r], hi[r]);
      for (int u = 0; u < 2; ++u) {
        __m512 wv[NR];
        for (int r = 0; r < NR; ++r) wv[r] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(u == 0 ? lo[r] : hi[r]));
        for (int m = 0; m < MR; ++m) {
          const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * u);
          for (int r = 0; r < NR; ++r) acc[r][m][u] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][u]);
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m512 sv = _mm512_set1_ps(bf16_to_float(s[r * ng + j]));
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(_mm512_add_ps(acc[r][m][0], acc[r][m][1]), sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = _mm512_reduce_add_ps(tot[r][m]);
}

// As dot_words_avx2, 16 lanes (blocks of 128 inputs); one ternary-logic op is the mask and the or,
// a masked load of the block's scales (never past the row) and one permute spread them to lanes.
template <int NR, int MR>
NXD_AVX512 static void dot_words_avx512(const uint8_t* w, const uint16_t* s, int64_t K, int64_t G, const float* x, float* out) {
  const int64_t KB = K / 2, ng = K / G;
  const __mmask16 smask = G < 128 ? __mmask16((1u << (128 / G)) - 1) : __mmask16(1);
  alignas(64) int32_t lane_group[16];
  for (int l = 0; l < 16; ++l) lane_group[l] = G < 128 ? int32_t(8 * l / G) : 0;
  const __m512i idx = _mm512_load_si512(lane_group);
  const __m512i mask = _mm512_set1_epi32(15), bias = _mm512_set1_epi32(0x4b000000);
  const __m512 magic = _mm512_set1_ps(kMagic);
  __m512 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 128) {
    __m512i D[NR];
    for (int r = 0; r < NR; ++r) D[r] = _mm512_loadu_si512(w + r * KB + k / 2);
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * KB + k / 2 + kPrefetch), _MM_HINT_T1);
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int i = 0; i < 8; ++i) {
      __m512 wv[NR];
      for (int r = 0; r < NR; ++r) {
        const __m512i v = _mm512_ternarylogic_epi32(_mm512_srli_epi32(D[r], 4 * i), mask, bias, 0xea);  // (a & b) | c
        wv[r] = _mm512_sub_ps(_mm512_castsi512_ps(v), magic);
      }
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * i);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      const __m256i raw = _mm256_maskz_loadu_epi16(smask, s + r * ng + k / G);
      const __m512 sv = _mm512_permutexvar_ps(idx, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = _mm512_reduce_add_ps(tot[r][m]);
}

// ---- AVX-512 BF16: table lookup and bf16 pair dot products (bf16 x only) --------------------------

#define NXD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

// Why: the fp32 paths spend 3 instructions widening each 16 weights before their FMA and top out
// near 15-20 G weights/s per core with W in cache (Zen 4), below what memory delivers. Here a 64-byte load holds 128 weights as
// 32 words of 4 nibbles; vpermw of (word >> 4j) against a table of the bf16 values of -8..7 (repeated,
// so index bit 4, the next nibble's low bit, is ignored) gives 32 weights as bf16, and vdpbf16ps
// multiplies them by 32 bf16 x into 16 fp32 sums: per 128 weights 3 shifts, 4 lookups, 4 dot
// products. Products of bf16 x and q are exact; sums are fp32 (vdpbf16ps flushes denormals).
//
// Layout per block of 128 inputs: word e of vector j is input 4e + j, and vdpbf16ps adds words
// 2i, 2i + 1 into lane i, so lane i sums inputs 8i .. 8i + 7 of the block, as in dot_words_avx512:
// a group (a multiple of 8 that divides or is a multiple of 128) covers whole lanes, and each block's
// sums meet a vector of per-lane scales. x is permuted into [j][e] per block, zero-padded to whole
// blocks (Kp inputs); a last partial block loads only its weights (the rest read as nibble 0, -8,
// against x = 0) and only its scales (0 for the padded lanes). Weights in cache: ~40 G/s per core.

// The bf16 values of q - 8 for nibbles 0..15, twice (vpermw's 5-bit index: bit 4 ignored).
alignas(64) static const uint16_t kBf16Table[32] = {
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
    0xc100, 0xc0e0, 0xc0c0, 0xc0a0, 0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0};

static bool bf16_fits(int64_t G) { return G % 8 == 0 && (128 % G == 0 || G % 128 == 0); }

// NR weight rows, `apart` rows from one another, against MR rows of permuted x; out[r * MR + m].
template <int NR, int MR>
NXD_AVX512BF16 static void dot_bf16(const uint8_t* w, const uint16_t* s, int64_t K, int64_t Kp, int64_t G, const uint16_t* x, float* out, int64_t apart = 1) {
  const int64_t KB = K / 2, ng = K / G;
  const __m512i lut = _mm512_load_si512(kBf16Table);
  // lane l's group within the block: 8l / G (G < 128), else the block's one scale.
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i idx = G < 128 ? _mm512_srlv_epi32(lanes, _mm512_set1_epi32(__builtin_ctzll(G / 8))) : _mm512_setzero_si512();
  const int per = G < 128 ? int(128 / G) : 1;  // scales per block
  __m512 tot[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kp; k += 128) {
    const bool partial = k + 128 > K;  // only the last block, where K is not a multiple of 128
    const __mmask32 wmask = partial ? __mmask32((1u << ((K - k) / 4)) - 1) : ~__mmask32(0);
    const int nscales = partial ? int(std::min<int64_t>(per, (K - k + G - 1) / G)) : per;
    const __mmask16 smask = __mmask16((1u << nscales) - 1);
    __m512i D[NR];
    for (int r = 0; r < NR; ++r) D[r] = _mm512_maskz_loadu_epi16(wmask, w + r * apart * KB + k / 2);
    for (int r = 0; r < NR; ++r) _mm_prefetch(reinterpret_cast<const char*>(w + r * apart * KB + k / 2 + kPrefetch), _MM_HINT_T1);
    __m512 acc[NR][MR];
    for (int r = 0; r < NR; ++r)
      for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      __m512i wv[NR];
      for (int r = 0; r < NR; ++r) wv[r] = _mm512_permutexvar_epi16(j == 0 ? D[r] : _mm512_srli_epi16(D[r], 4 * j), lut);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * Kp + k + 32 * j);
        for (int r = 0; r < NR; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv[r], (__m512bh)xv);
      }
    }
    for (int r = 0; r < NR; ++r) {
      __m512 sv;
      if (per == 1) {  // G >= 128: the block's one scale
        sv = _mm512_set1_ps(bf16_to_float(s[r * apart * ng + k / G]));
      } else {
        const __m256i raw = _mm256_maskz_loadu_epi16(smask, s + r * apart * ng + k / G);
        sv = _mm512_permutexvar_ps(idx, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
      }
      for (int m = 0; m < MR; ++m) tot[r][m] = _mm512_fmadd_ps(acc[r][m], sv, tot[r][m]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[r * MR + m] = _mm512_reduce_add_ps(tot[r][m]);
}


// ---- driver -----------------------------------------------------------------------------------

// The CPU's best path; NXD_INT4_KERNEL (avx2, avx512, avx512bf16; read once per process) lowers it
// so each path can be tested on one machine, never raises it past what the CPU has.
enum Isa { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };

static Isa chosen_isa() {
  static const Isa isa = [] {
    // __builtin_cpu_supports also checks that the OS saves the AVX-512 registers.
    Isa best = kAvx2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) best = kAvx512;
    if (best == kAvx512 && __builtin_cpu_supports("avx512bf16")) best = kAvx512Bf16;
    const char* forced = std::getenv("NXD_INT4_KERNEL");
    const std::string f = forced ? forced : "";
    if (f == "avx2") return kAvx2;
    if (f == "avx512") return std::min(best, kAvx512);
    return best;
  }();
  return isa;
}

// A call's path: the bf16 one only for bf16 x (fp32 x rounded to bf16 would lose precision) and a
// group it fits; words: the fp32 paths' word-lane layout (see dot_words_avx2).
enum Path { kPathAvx2 = 0, kPathAvx512 = 1, kPathBf16 = 2 };

struct Weights {
  const uint8_t* w;   // packed [N, K / 2]
  const uint16_t* s;  // bf16 scales [N, ng]
  int64_t K, G, ng;
  bool words;
  int64_t Kp;  // the bf16 path's row stride of x: K rounded up to 128
};

// Whether the word-lane layout fits K and G for blocks of `block` (64 or 128) inputs.
static bool words_fit(int64_t K, int64_t G, int64_t block) {
  return K % block == 0 && G % 8 == 0 && (block % G == 0 || G % block == 0);
}

template <int P, int NR, int MR>
static inline void tile(const Weights& W, const void* xv, int64_t m, int64_t n, int64_t nb, float* acc, int64_t apart = 1) {
  float part[NR * MR];
  const uint8_t* w = W.w + n * (W.K / 2);
  const uint16_t* s = W.s + n * W.ng;
  if constexpr (P == kPathBf16) {
    dot_bf16<NR, MR>(w, s, W.K, W.Kp, W.G, static_cast<const uint16_t*>(xv) + m * W.Kp, part, apart);
  } else {
    const float* x = static_cast<const float*>(xv) + m * W.K;
    if (W.words) {
      if constexpr (P == kPathAvx512) dot_words_avx512<NR, MR>(w, s, W.K, W.G, x, part);
      else dot_words_avx2<NR, MR>(w, s, W.K, W.G, x, part);
    } else {
      if constexpr (P == kPathAvx512) dot_avx512<NR, MR>(w, s, W.K, W.G, x, part);
      else dot_avx2<NR, MR>(w, s, W.K, W.G, x, part);
      if (W.G % 32) tails<NR, MR>(w, s, W.K, W.G, x, part);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < MR; ++i) acc[(m + i) * nb + n + r * apart] = part[r * MR + i];
}

// NR weight rows at a time against all M rows of x, MR at a time, while those rows sit in L1.
// Registers: NR * MR group sums and as many totals (AVX2: 16 ymm, AVX-512: 32 zmm). Each (weight
// row, x row) pair is summed in the same order whatever the tile, so a row's result does not
// depend on M or on the thread split.
// apart: how many rows separate the NR weight rows of a tile (the bf16 path only).
template <int P, int NR>
static void rows_tiles(const Weights& W, const void* x, int64_t M, int64_t n, int64_t nb, float* acc, int64_t apart = 1) {
  constexpr int kMaxMR = P == kPathAvx2 ? 2 : 4;
  int64_t m = 0;
  for (; m + kMaxMR <= M; m += kMaxMR) tile<P, NR, kMaxMR>(W, x, m, n, nb, acc, apart);
  if (kMaxMR > 2 && M - m >= 2) tile<P, NR, 2>(W, x, m, n, nb, acc, apart), m += 2;
  if (M - m == 1) tile<P, NR, 1>(W, x, m, n, nb, acc, apart);
}

// Rows [0, nb) of W (already offset) against all M rows of x into acc[M][nb]. Two weight rows per
// tile halve the loads of x, which are 8 bytes per weight byte (fp32 x against two int4).
template <int P>
static void rows_range(const Weights& W, const void* x, int64_t M, int64_t nb, float* acc) {
  if constexpr (P == kPathBf16) {  // row n with row n + nb / 2: each streams through its own pages
    // (adjacent rows share 4 KB pages; measured on the 1.1B layout's int4-g128 pass from memory, 2
    // threads, best of 20 alternating: 30.0 GB/s against 27.6, medians 27.7 against 24.6)
    const int64_t half = nb / 2;
    for (int64_t n = 0; n < half; ++n) rows_tiles<P, 2>(W, x, M, n, nb, acc, half);
    if (nb % 2) rows_tiles<P, 1>(W, x, M, nb - 1, nb, acc);
    return;
  }
  int64_t n = 0;
  for (; n + 2 <= nb; n += 2) rows_tiles<P, 2>(W, x, M, n, nb, acc);
  if (n < nb) rows_tiles<P, 1>(W, x, M, n, nb, acc);
}

// x widened to fp32 and permuted into the fp32 paths' nibble order, [M, K].
static void permute_fp32(const at::Tensor& xc, bool words, int64_t block, int64_t G, float* xd) {
  const int64_t M = xc.size(0), K = xc.size(1), lanes = block / 8, full = G / 32 * 32;
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const uint16_t* xb = bf16 ? reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) : nullptr;
  const float* xf = bf16 ? nullptr : xc.data_ptr<float>();
  auto at_k = [&](int64_t i) { return bf16 ? bf16_to_float(xb[i]) : xf[i]; };
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; words && b < K; b += block)
      for (int64_t l = 0; l < lanes; ++l)
        for (int i = 0; i < 8; ++i) xd[m * K + b + i * lanes + l] = at_k(m * K + b + 8 * l + i);
  for (int64_t m = 0; m < M && !words; ++m)
    for (int64_t k0 = 0; k0 < K; k0 += G) {
      const int64_t row = m * K;
      for (int64_t b = k0; b < k0 + full; b += 32)
        for (int i = 0; i < 16; ++i) {
          xd[row + b + i] = at_k(row + b + 2 * i);
          xd[row + b + 16 + i] = at_k(row + b + 2 * i + 1);
        }
      for (int64_t k = k0 + full; k < k0 + G; ++k) xd[row + k] = at_k(row + k);
    }
}

// bf16 x permuted into the bf16 path's order ([j][e] is input 4e + j per block), [M, Kp], zero-padded.
static void permute_bf16(const at::Tensor& xc, int64_t Kp, uint16_t* xd) {
  const int64_t M = xc.size(0), K = xc.size(1);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < Kp; b += 128)
      for (int j = 0; j < 4; ++j)
        for (int e = 0; e < 32; ++e) {
          const int64_t k = b + 4 * e + j;
          xd[m * Kp + b + 32 * j + e] = k < K ? xb[m * K + k] : 0;
        }
}

// x [M, K] against the int4 weights packed[0..P) (each [N_p, K / 2], scales [N_p, groups] of one
// group size) into out [M, sum N_p]: part p's outputs are columns [offset_p, offset_p + N_p). One
// call for q, k and v (or gate and up) pays the fixed costs once: the threads' start and finish,
// and x's preparation.
static at::Tensor linear_parts(const at::Tensor& x_in, at::TensorList packs, at::TensorList scales) {
  TORCH_CHECK(!packs.empty() && packs.size() == scales.size(), "int4_linear: as many scales as weights, at least one");
  TORCH_CHECK(x_in.dim() == 2, "int4_linear: x [M, K] and packed [N, K / 2]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, "int4_linear: x bfloat16 or float32");
  const int64_t M = x_in.size(0), K = x_in.size(1), ng = scales[0].dim() == 2 ? scales[0].size(1) : 0;
  std::vector<int64_t> rows, offset;
  std::vector<at::Tensor> scs;
  int64_t total = 0;
  for (size_t p = 0; p < packs.size(); ++p) {
    const at::Tensor& packed = packs[p];
    const at::Tensor& scale = scales[p];
    TORCH_CHECK(packed.dim() == 2 && K == 2 * packed.size(1), "int4_linear: x [M, K] and packed [N, K / 2]");
    TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4_linear: packed uint8, contiguous");
    TORCH_CHECK(scale.scalar_type() == at::kBFloat16 && scale.dim() == 2 && scale.size(0) == packed.size(0) && scale.size(1) > 0,
                "int4_linear: scale bfloat16 [N, groups]");
    TORCH_CHECK(scale.size(1) == ng, "int4_linear: the weights of one call share a group size");
    rows.push_back(packed.size(0));
    offset.push_back(total);
    total += packed.size(0);
    scs.push_back(scale.contiguous());
  }
  TORCH_CHECK(K % ng == 0 && (K / ng) % 2 == 0, "int4_linear: the groups must split K into equal even parts");
  const int64_t G = K / ng;
  const at::Tensor xc = x_in.contiguous();
  const bool bf16 = xc.scalar_type() == at::kBFloat16;
  const Isa isa = chosen_isa();
  const Path path = isa == kAvx512Bf16 && bf16 && bf16_fits(G) ? kPathBf16 : isa >= kAvx512 ? kPathAvx512 : kPathAvx2;
  const int64_t block = path == kPathAvx2 ? 64 : 128, Kp = (K + 127) / 128 * 128;
  const bool words = path != kPathBf16 && words_fit(K, G, block);
  // x permuted once per call (a few KB per row), in a tensor: 64-byte aligned, so no 64-byte load
  // of x straddles two cache lines.
  at::Tensor xw;
  if (path == kPathBf16) {
    xw = at::empty({M, Kp}, xc.options());
    permute_bf16(xc, Kp, reinterpret_cast<uint16_t*>(xw.data_ptr<at::BFloat16>()));
  } else {
    xw = at::empty({M, K}, xc.options().dtype(at::kFloat));
    permute_fp32(xc, words, block, G, xw.data_ptr<float>());
  }
  const char* x = static_cast<const char*>(xw.data_ptr());
  const int64_t x_row_bytes = path == kPathBf16 ? Kp * 2 : K * 4;
  at::Tensor out = at::empty({M, total}, xc.options());
  if (M == 0 || total == 0) return out;
  uint16_t* ob = bf16 ? reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) : nullptr;
  float* of = bf16 ? nullptr : out.data_ptr<float>();
  split_parts(rows, 64, [&](int64_t p, int64_t begin, int64_t end) {  // chunks of 64 rows: whole blocks
    const uint8_t* wp = packs[p].data_ptr<uint8_t>();
    const uint16_t* sp = reinterpret_cast<const uint16_t*>(scs[p].data_ptr<at::BFloat16>());
    // Blocks of rows so the fp32 sums for all M rows stay on the stack, then round once.
    constexpr int64_t kBlock = 64;
    float acc[16 * kBlock];
    const int64_t mb = 16;
    // More than 16 rows of x: the next 16 meet the same block of W again, now in L2.
    for (int64_t n0 = begin; n0 < end; n0 += kBlock) {
      const int64_t n1 = std::min(end, n0 + kBlock), nb = n1 - n0;
      const Weights Wb{wp + n0 * (K / 2), sp + n0 * ng, K, G, ng, words, Kp};
      for (int64_t m0 = 0; m0 < M; m0 += mb) {
        const int64_t mc = std::min(mb, M - m0);
        const void* xm = x + m0 * x_row_bytes;
        if (path == kPathBf16) rows_range<kPathBf16>(Wb, xm, mc, nb, acc);
        else if (path == kPathAvx512) rows_range<kPathAvx512>(Wb, xm, mc, nb, acc);
        else rows_range<kPathAvx2>(Wb, xm, mc, nb, acc);
        for (int64_t m = 0; m < mc; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            const float v = acc[m * nb + n - n0];
            const int64_t at = (m0 + m) * total + offset[p] + n;
            if (bf16) ob[at] = float_to_bf16(v);
            else of[at] = v;
          }
      }
    }
  });
  return out;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale) { return linear_parts(x, {packed}, {scale}); }

// x [M, K] against several int4 weights (one group size) at once: [M, sum of their rows], each weight's outputs in turn.
at::Tensor int4_linear_many(const at::Tensor& x, at::TensorList packs, at::TensorList scales) { return linear_parts(x, packs, scales); }

std::string int4_linear_isa() {
  const Isa isa = chosen_isa();
  return isa == kAvx512Bf16 ? "avx512bf16" : isa == kAvx512 ? "avx512" : "avx2";
}

// Registered with the dispatcher (not pybind): a call costs what any aten op costs. A fragment of
// the nxd namespace, which bf16_linear.cpp defines.
TORCH_LIBRARY_FRAGMENT(nxd, m) {
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scale) -> Tensor");
  m.def("int4_linear_many(Tensor x, Tensor[] packs, Tensor[] scales) -> Tensor");
  m.def("int4_linear_isa() -> str", &int4_linear_isa);
}
TORCH_LIBRARY_IMPL(nxd, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int4_linear_many", &int4_linear_many);
}
