// out [b, heads, s, d] = softmax(q k^T * scale, masked) v for a few queries per row (decoding and
// speculative verification) over a KV cache k, v [b, kv_heads, slots, d], float32 or bfloat16.
//
// Why by hand: a decode step's attention is a handful of tiny products per layer. ATen's bmm spends
// 20-60 us per call on them (two per layer, plus the softmax between), whatever the size, and it
// reads every slot of the cache, filled or not. Here one call per layer does the whole attention,
// and each row reads only the slots up to the last one its mask lets through: the cost follows the
// text's length, not the cache's.
//
// Arithmetic, as few_query_attention in nxd_models/llama.py does it: scores in float32 (exact
// products of the inputs, summed in fp32), softmax in float32, the probabilities rounded to v's
// dtype, then summed against v in float32 and rounded once to q's dtype. The query heads that share
// a KV head (GQA) read it together. A query's result depends on nothing but its own row and mask:
// masked slots weigh exactly 0 (the serving engine and speculative decoding rely on row invariance).
//
// AVX2+FMA (the file's flags); bf16 inputs take vdpbf16ps where the CPU has AVX512_BF16;
// nxd_core/attention_kernel.py sends other CPUs to the Python path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_common.h"
#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <vector>

// exp for 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; within 2 ulp of
// std::exp). Inputs below -87 (a masked score is -inf) give exactly 0.
static inline __m256 exp8(__m256 x) {
  const __m256 zero_below = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(zero_below, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}

// The 8 sums of 8 vectors: out[u] = sum of the lanes of a[u].
static inline __m256 sum_each(const __m256* a) {
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

template <typename T>
static inline float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else return bf16_to_float(v);
}

// n values (a multiple of 8) of T into fp32
template <typename T>
static inline void widen(const T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 8) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
    } else {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  }
}

// Rounds 8 probabilities to T and back (they meet v in v's dtype, as in the matmul path): to
// nearest even, as float_to_bf16 does (probabilities are finite: no NaN case).
template <typename T>
static inline __m256 as_dtype8(__m256 p) {
  if constexpr (std::is_same_v<T, float>) return p;
  else {
    const __m256i u = _mm256_castps_si256(p);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
    return _mm256_castsi256_ps(_mm256_and_si256(rounded, _mm256_set1_epi32(int32_t(0xffff0000u))));
  }
}

// ---- AVX512_BF16 (bf16 inputs, where the CPU has it) ------------------------------------------
//
// vdpbf16ps takes q and k as stored, 32 products per instruction (the products are exact in fp32,
// as the widened FMAs' are; the sums are fp32), twice the multiply-adds per cycle of AVX2's fp32
// FMAs and no widening of the K tile. Chosen at run time (decode_attention_set_isa); float32
// inputs always take the AVX2 path.

#define NXD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))

enum Isa { kAvx2 = 0, kAvx512Bf16 = 1 };
static const char* const kIsaNames[] = {"avx2", "avx512bf16"};
static bool cpu_supports(Isa isa) {
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
}
static Isa g_isa = cpu_supports(kAvx512Bf16) ? kAvx512Bf16 : kAvx2;  // the best this CPU has, unless set

// The lane sums of a[0..7] as one vector [sum a0, ..., sum a7], each in _mm512_reduce_add_ps's
// order whatever the other seven are (row invariance; the steps are cpu_common.h's).
NXD_AVX512BF16 static inline __m256 lane_sums8(const __m512* a) {
  const __m512 q0 = quarters_added(halves_added(a[0], a[1]), halves_added(a[2], a[3]));  // 128-bit lane j: a_j
  const __m512 q1 = quarters_added(halves_added(a[4], a[5]), halves_added(a[6], a[7]));  // a_4+j
  const __m512 p = pairs_added(q0, q1);   // 128-bit lane j: [a_j, a_j, a_4+j, a_4+j]
  const __m512 z = neighbours_added(p, p);  // 128-bit lane j: [a_j, a_4+j, a_j, a_4+j]
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, z));
}

// The unscaled scores of R query rows against 8 key rows: out[r] = [q_r . k_u for u < 8].
template <int R>
NXD_AVX512BF16 static void scores_bf16(const uint16_t* const* q, const uint16_t* const* k, int64_t d, __m256* out) {
  __m512 acc[R][8];
  _Pragma("GCC unroll 2") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 8") for (int u = 0; u < 8; ++u) acc[r][u] = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 32) {
    const __mmask32 mask = d - i >= 32 ? ~__mmask32(0) : __mmask32((1u << (d - i)) - 1);
    __m512bh qv[R];
    _Pragma("GCC unroll 2") for (int r = 0; r < R; ++r) qv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, q[r] + i);
    _Pragma("GCC unroll 8") for (int u = 0; u < 8; ++u) {
      const __m512bh kv = (__m512bh)_mm512_maskz_loadu_epi16(mask, k[u] + i);
      _Pragma("GCC unroll 2") for (int r = 0; r < R; ++r) acc[r][u] = _mm512_dpbf16_ps(acc[r][u], qv[r], kv);
    }
  }
  _Pragma("GCC unroll 2") for (int r = 0; r < R; ++r) out[r] = lane_sums8(acc[r]);
}

// Probabilities times V on AVX512_BF16: vdpbf16ps on pairs of slots. V's rows j and j + 1 are
// interleaved once per call (pairs[p][chunk] = unpacklo/hi of the two rows' 32 dims: fp32 lane
// (128-bit lane L, element e) of lo holds dim 8L + e, of hi dim 8L + 4 + e), then every query
// streams them against its probabilities packed as bf16 pairs. Each output sums its slot pairs in
// order, whatever R is.
NXD_AVX512BF16 static void interleave_values(const uint16_t* v, int64_t vs, int64_t end, int64_t d, int64_t chunks,
                                             const uint16_t* zero_row, __m512i* pairs) {
  for (int64_t j = 0; j < end; j += 2) {
    const uint16_t* a = v + j * vs;
    const uint16_t* b = j + 1 < end ? v + (j + 1) * vs : zero_row;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i = 32 * c;
      const __mmask32 mask = d - i >= 32 ? ~__mmask32(0) : d <= i ? __mmask32(0) : __mmask32((1u << (d - i)) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(mask, a + i), y = _mm512_maskz_loadu_epi16(mask, b + i);
      pairs[((j / 2) * chunks + c) * 2] = _mm512_unpacklo_epi16(x, y);
      pairs[((j / 2) * chunks + c) * 2 + 1] = _mm512_unpackhi_epi16(x, y);
    }
  }
}

// R queries (probabilities packed: p[r][pair] = bf16 p_2i | bf16 p_2i+1 << 16) against the
// interleaved values: out[r][dim], fp32, for dims < 32 * CH.
template <int R, int CH>
NXD_AVX512BF16 static void values_bf16(const uint32_t* const* p, const __m512i* pairs, int64_t npairs, float* const* out, int64_t d) {
  __m512 acc[R][CH][2];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int c = 0; c < CH; ++c) acc[r][c][0] = acc[r][c][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < npairs; ++i) {
    const __m512i* pv = pairs + i * CH * 2;
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m512bh pr = (__m512bh)_mm512_set1_epi32(int32_t(p[r][i]));
      _Pragma("GCC unroll 4") for (int c = 0; c < CH; ++c) {
        acc[r][c][0] = _mm512_dpbf16_ps(acc[r][c][0], (__m512bh)pv[2 * c], pr);
        acc[r][c][1] = _mm512_dpbf16_ps(acc[r][c][1], (__m512bh)pv[2 * c + 1], pr);
      }
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r)
    _Pragma("GCC unroll 4") for (int c = 0; c < CH; ++c) {
      alignas(64) float lo[16], hi[16];
      _mm512_store_ps(lo, acc[r][c][0]);
      _mm512_store_ps(hi, acc[r][c][1]);
      for (int L = 0; L < 4; ++L)
        for (int e = 0; e < 4; ++e) {
          const int64_t i = 32 * c + 8 * L + e;
          if (i < d) out[r][i] = lo[4 * L + e];
          if (i + 4 < d) out[r][i + 4] = hi[4 * L + e];
        }
    }
}

template <int CH>
NXD_AVX512BF16 static void values_rows_bf16(const uint32_t* pk, int64_t pstride, const __m512i* pairs, int64_t npairs, float* acc,
                                            int64_t d, int64_t G) {
  constexpr int R = 8 / CH;  // 16 accumulators
  int64_t r = 0;
  for (; r + R <= G; r += R) {
    const uint32_t* p[R];
    float* out[R];
    for (int i = 0; i < R; ++i) p[i] = pk + (r + i) * pstride, out[i] = acc + (r + i) * d;
    values_bf16<R, CH>(p, pairs, npairs, out, d);
  }
  for (; r < G; ++r) {
    const uint32_t* p[1] = {pk + r * pstride};
    float* out[1] = {acc + r * d};
    values_bf16<1, CH>(p, pairs, npairs, out, d);
  }
}

struct Strides {
  int64_t b, h, s;  // of one tensor's first three dimensions (the last is contiguous)
};

// One row b and KV head h: the G = group * s queries that read it.
template <typename T>
static void attend_one(const T* q, Strides qs, const T* k, const T* v, Strides ks, Strides vs, const bool* mask, int64_t mask_s,
                       T* out, int64_t group, int64_t s, int64_t d, int64_t end, float scale) {
  const int64_t G = group * s, end8 = (end + 7) / 8 * 8;
  // scratch: no zero-fill where every element is written before it is read
  std::unique_ptr<float[]> qf(new float[G * d]), sc(new float[G * end8]), tile(new float[8 * d]);
  std::vector<float> acc(G * d, 0.0f);
  // bf16 inputs on AVX512_BF16: both products by vdpbf16ps (V's pairs for head sizes up to 128)
  const bool dot_bf16 = std::is_same_v<T, uint16_t> && g_isa == kAvx512Bf16;
  if (!dot_bf16)  // the AVX2 scores read q widened
    for (int64_t g = 0; g < group; ++g)
      for (int64_t t = 0; t < s; ++t) {
        const T* src = q + g * qs.h + t * qs.s;
        for (int64_t i = 0; i < d; ++i) qf[(g * s + t) * d + i] = to_float(src[i]);
      }
  // Scores, 8 slots at a time: the tile of K is widened once and read by every query.
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const std::vector<uint16_t> zero_row(d, 0);  // the key of a slot past `end` (never read from the cache)
  for (int64_t j = 0; j < end8; j += 8) {
    // Two queries at a time share each load of the tile (4 slots per pass: 8 accumulators, within
    // AVX2's 16 registers); a query alone sums the same products in the same order.
    // The unroll pragmas keep the accumulators in registers: without them GCC 12 stored them after
    // every product (one layer, 32/4 heads, d 64, bf16: 1.12-1.33x faster with them).
    auto store = [&](int64_t r, __m256 sums) {
      const __m256 scores = _mm256_mul_ps(sums, _mm256_set1_ps(scale));
      const bool* m = mask + (r % s) * mask_s + j;
      __m256i keep;
      if (j + 8 <= end) {  // a whole tile: its 8 mask bytes as lanes
        keep = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m))), _mm256_setzero_si256());
      } else {  // the last tile: never read the mask past `end` (it may be the row's end)
        alignas(32) int32_t lanes[8];
        for (int u = 0; u < 8; ++u) lanes[u] = (j + u < end && m[u]) ? -1 : 0;
        keep = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
      }
      _mm256_storeu_ps(sc.get() + r * end8 + j, _mm256_blendv_ps(minus_inf, scores, _mm256_castsi256_ps(keep)));
    };
    if constexpr (std::is_same_v<T, uint16_t>) {
      if (dot_bf16) {
        const uint16_t* keys[8];
        for (int64_t u = 0; u < 8; ++u) keys[u] = j + u < end ? k + (j + u) * ks.s : zero_row.data();
        auto row = [&](int64_t r) { return q + (r / s) * qs.h + (r % s) * qs.s; };
        __m256 sums[2];
        int64_t r = 0;
        for (; r + 2 <= G; r += 2) {  // two queries share each load of a key
          const uint16_t* rows[2] = {row(r), row(r + 1)};
          scores_bf16<2>(rows, keys, d, sums);
          store(r, sums[0]);
          store(r + 1, sums[1]);
        }
        if (r < G) {
          const uint16_t* rows[1] = {row(r)};
          scores_bf16<1>(rows, keys, d, sums);
          store(r, sums[0]);
        }
        continue;
      }
    }
    for (int64_t u = 0; u < 8; ++u) {
      if (j + u < end) widen(k + (j + u) * ks.s, d, tile.get() + u * d);
      else std::fill(tile.get() + u * d, tile.get() + (u + 1) * d, 0.0f);
    }
    int64_t r = 0;
    for (; r + 2 <= G; r += 2) {
      __m256 a0[8], a1[8];
      const float *q0 = qf.get() + r * d, *q1 = q0 + d;
      _Pragma("GCC unroll 2") for (int h = 0; h < 8; h += 4) {
        _Pragma("GCC unroll 4") for (int u = h; u < h + 4; ++u) a0[u] = a1[u] = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8) {
          const __m256 x0 = _mm256_loadu_ps(q0 + i), x1 = _mm256_loadu_ps(q1 + i);
          _Pragma("GCC unroll 4") for (int u = h; u < h + 4; ++u) {
            const __m256 t = _mm256_loadu_ps(tile.get() + u * d + i);
            a0[u] = _mm256_fmadd_ps(x0, t, a0[u]);
            a1[u] = _mm256_fmadd_ps(x1, t, a1[u]);
          }
        }
      }
      store(r, sum_each(a0));
      store(r + 1, sum_each(a1));
    }
    for (; r < G; ++r) {
      __m256 a[8];
      _Pragma("GCC unroll 8") for (int u = 0; u < 8; ++u) a[u] = _mm256_setzero_ps();
      const float* qr = qf.get() + r * d;
      for (int64_t i = 0; i < d; i += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + i);
        _Pragma("GCC unroll 8") for (int u = 0; u < 8; ++u) a[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(tile.get() + u * d + i), a[u]);
      }
      store(r, sum_each(a));
    }
  }
  // Softmax per query, in fp32; the probabilities rounded to T.
  for (int64_t r = 0; r < G; ++r) {
    float* row = sc.get() + r * end8;
    __m256 mx = minus_inf;
    for (int64_t j = 0; j < end8; j += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(row + j));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float top = _mm_cvtss_f32(m4);
    if (top == -std::numeric_limits<float>::infinity()) {  // no slot allowed (never in decoding): zeros
      std::fill(row, row + end8, 0.0f);
      continue;
    }
    const __m256 topv = _mm256_set1_ps(top);
    __m256 total = _mm256_setzero_ps();
    for (int64_t j = 0; j < end8; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), topv));
      _mm256_storeu_ps(row + j, e);
      total = _mm256_add_ps(total, e);
    }
    const __m256 inv = _mm256_set1_ps(1.0f / hsum8(total));
    for (int64_t j = 0; j < end8; j += 8) _mm256_storeu_ps(row + j, as_dtype8<T>(_mm256_mul_ps(_mm256_loadu_ps(row + j), inv)));
  }
  bool values_done = false;
  if constexpr (std::is_same_v<T, uint16_t>) {
    if (dot_bf16 && d <= 128) {
      const int64_t chunks = d <= 32 ? 1 : d <= 64 ? 2 : 4, npairs = (end + 1) / 2, pstride = end8 / 2;
      std::unique_ptr<__m512i[]> pairs(new __m512i[std::max<int64_t>(1, npairs * chunks * 2)]);
      interleave_values(v, vs.s, end, d, chunks, zero_row.data(), pairs.get());
      // the probabilities (rounded to bf16 above: the top half of each float) packed in pairs
      std::unique_ptr<uint32_t[]> pk(new uint32_t[G * pstride]);
      for (int64_t r = 0; r < G; ++r)
        for (int64_t i = 0; i < pstride; ++i) {
          uint32_t a, b;
          std::memcpy(&a, sc.get() + r * end8 + 2 * i, 4);
          std::memcpy(&b, sc.get() + r * end8 + 2 * i + 1, 4);
          pk[r * pstride + i] = (a >> 16) | (b & 0xffff0000u);
        }
      if (chunks == 1) values_rows_bf16<1>(pk.get(), pstride, pairs.get(), npairs, acc.data(), d, G);
      else if (chunks == 2) values_rows_bf16<2>(pk.get(), pstride, pairs.get(), npairs, acc.data(), d, G);
      else values_rows_bf16<4>(pk.get(), pstride, pairs.get(), npairs, acc.data(), d, G);
      values_done = true;
    }
  }
  if (!values_done) {  // AVX2: the probabilities times V, 8 slots at a time, summed in fp32
    for (int64_t j = 0; j < end; j += 8) {
      const int64_t n = std::min<int64_t>(8, end - j);
      for (int64_t u = 0; u < n; ++u) widen(v + (j + u) * vs.s, d, tile.get() + u * d);
      // Two queries at a time share each load of the tile, 32 outputs per pass (8 accumulators);
      // every output sums its slots in order either way.
      int64_t r = 0;
      for (; r + 2 <= G; r += 2) {
        const float *p0 = sc.get() + r * end8 + j, *p1 = p0 + end8;
        float *o0 = acc.data() + r * d, *o1 = o0 + d;
        int64_t i = 0;
        for (; i + 32 <= d; i += 32) {
          __m256 c0[4], c1[4];
          _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) c0[c] = _mm256_loadu_ps(o0 + i + 8 * c), c1[c] = _mm256_loadu_ps(o1 + i + 8 * c);
          for (int64_t u = 0; u < n; ++u) {
            const __m256 b0 = _mm256_set1_ps(p0[u]), b1 = _mm256_set1_ps(p1[u]);
            _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) {
              const __m256 t = _mm256_loadu_ps(tile.get() + u * d + i + 8 * c);
              c0[c] = _mm256_fmadd_ps(b0, t, c0[c]);
              c1[c] = _mm256_fmadd_ps(b1, t, c1[c]);
            }
          }
          _Pragma("GCC unroll 4") for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o0 + i + 8 * c, c0[c]), _mm256_storeu_ps(o1 + i + 8 * c, c1[c]);
        }
        for (; i < d; i += 8) {
          __m256 c0 = _mm256_loadu_ps(o0 + i), c1 = _mm256_loadu_ps(o1 + i);
          for (int64_t u = 0; u < n; ++u) {
            const __m256 t = _mm256_loadu_ps(tile.get() + u * d + i);
            c0 = _mm256_fmadd_ps(_mm256_set1_ps(p0[u]), t, c0);
            c1 = _mm256_fmadd_ps(_mm256_set1_ps(p1[u]), t, c1);
          }
          _mm256_storeu_ps(o0 + i, c0), _mm256_storeu_ps(o1 + i, c1);
        }
      }
      for (; r < G; ++r) {
        const float* p = sc.get() + r * end8 + j;
        float* o = acc.data() + r * d;
        __m256 pu[8];
        for (int64_t u = 0; u < n; ++u) pu[u] = _mm256_set1_ps(p[u]);
        for (int64_t i = 0; i < d; i += 8) {
          __m256 a = _mm256_loadu_ps(o + i);
          for (int64_t u = 0; u < n; ++u) a = _mm256_fmadd_ps(pu[u], _mm256_loadu_ps(tile.get() + u * d + i), a);
          _mm256_storeu_ps(o + i, a);
        }
      }
    }
  }
  for (int64_t g = 0; g < group; ++g)
    for (int64_t t = 0; t < s; ++t) {
      const float* src = acc.data() + (g * s + t) * d;
      T* dst = out + (g * s + t) * d;
      for (int64_t i = 0; i < d; ++i) {
        if constexpr (std::is_same_v<T, float>) dst[i] = src[i];
        else dst[i] = float_to_bf16(src[i]);
      }
    }
}

// Below this many multiply-adds a call stays on one thread (waking the others costs more).
constexpr int64_t kParallelWork = 1 << 16;

template <typename T>
static void attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& mask, torch::Tensor& out,
                   double scale) {
  const int64_t B = q.size(0), H = q.size(1), s = q.size(2), d = q.size(3), KV = k.size(1), S = k.size(2), group = H / KV;
  const bool* m = mask.data_ptr<bool>();  // [B, 1, s, S], contiguous
  // Each row's end: one past the last slot any of its queries may see.
  std::vector<int64_t> ends(B, 0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < s; ++t) {
      const bool* row = m + (b * s + t) * S;
      int64_t last = S;
      while (last > 0 && !row[last - 1]) --last;
      ends[b] = std::max(ends[b], last);
    }
  const int64_t longest = *std::max_element(ends.begin(), ends.end());
  const int64_t work = std::max<int64_t>(1, group * s * longest * d * 2);
  const Strides qs{q.stride(0), q.stride(1), q.stride(2)}, ks{k.stride(0), k.stride(1), k.stride(2)}, vs{v.stride(0), v.stride(1), v.stride(2)};
  const T* qp = reinterpret_cast<const T*>(q.data_ptr());
  const T* kp = reinterpret_cast<const T*>(k.data_ptr());
  const T* vp = reinterpret_cast<const T*>(v.data_ptr());
  T* op = reinterpret_cast<T*>(out.data_ptr());
  const int64_t grain = std::max<int64_t>(1, kParallelWork / work);
  at::parallel_for(0, B * KV, grain, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / KV, h = task % KV;
      attend_one<T>(qp + b * qs.b + h * group * qs.h, qs, kp + b * ks.b + h * ks.h, vp + b * vs.b + h * vs.h, ks, vs, m + b * s * S, S,
                    op + (b * H + h * group) * s * d, group, s, d, ends[b], float(scale));
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode_attention: q, k, v must be 4-D, got ", q.sizes(), k.sizes(), v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "decode_attention: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "decode_attention: float32 or bfloat16, got ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), s = q.size(2), d = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == d && KV > 0 && H % KV == 0,
              "decode_attention: k, v [b, kv_heads, slots, d] do not fit q ", q.sizes(), ": ", k.sizes(), v.sizes());
  TORCH_CHECK(d % 8 == 0, "decode_attention: head size ", d, " is not a multiple of 8");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: the head dimension must be contiguous");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention: the mask must be bool");
  const torch::Tensor m = mask.expand({B, 1, s, S}).contiguous();
  auto out = torch::empty({B, H, s, d}, q.options());
  if (q.scalar_type() == at::kFloat) attend<float>(q, k, v, m, out, scale);
  else attend<uint16_t>(q, k, v, m, out, scale);
  return out;
}

std::string decode_attention_set_isa(const std::string& name) {
  for (int i = 0; i < 2; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(cpu_supports(Isa(i)), "decode_attention_set_isa: this CPU has no ", name);
      g_isa = Isa(i);
      return name;
    }
  TORCH_CHECK(false, "decode_attention_set_isa: unknown path '", name, "' (avx2 or avx512bf16)");
}

std::string decode_attention_isa() { return kIsaNames[g_isa]; }

TORCH_LIBRARY_FRAGMENT(nxd, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("decode_attention_set_isa(str isa) -> str", &decode_attention_set_isa);
  m.def("decode_attention_isa() -> str", &decode_attention_isa);
}
TORCH_LIBRARY_IMPL(nxd, CPU, m) { m.impl("decode_attention", &decode_attention); }
