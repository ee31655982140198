// What the CPU decode kernels (bf16_linear.cpp, int8_linear.cpp, int4_linear.cpp,
// decode_attention.cpp) share: bf16 conversions, an AVX2 horizontal sum, the steps of summing many
// AVX-512 vectors at once, and how they split the rows of one or several matrices over threads. cpp_build.build_and_load
// puts a digest of this header in each kernel's build flags, so that a change here rebuilds them
// (torch's loader hashes only the listed sources).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

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

// The sum of a vector's 8 lanes (every file including this is built with -mavx2).
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// The steps of summing many 16-lane vectors at once, each in _mm512_reduce_add_ps's order (lane i
// with i + 8, then i + 4, i + 2, i + 1), so that a sum has the same bits alone or with others
// (row invariance): each step adds two vectors' halves, quarters, pairs or neighbours into one.
#define NXD_REDUCE_AVX512 __attribute__((target("avx512f")))
NXD_REDUCE_AVX512 static inline __m512 halves_added(__m512 a, __m512 b) {  // [a_i + a_i+8 | b_i + b_i+8]
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
NXD_REDUCE_AVX512 static inline __m512 quarters_added(__m512 a, __m512 b) {  // 8-lane halves -> 4-lane quarters
  return _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}
NXD_REDUCE_AVX512 static inline __m512 pairs_added(__m512 a, __m512 b) {  // per 128 bits: [a0+a2, a1+a3, b0+b2, b1+b3]
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
}
NXD_REDUCE_AVX512 static inline __m512 neighbours_added(__m512 a, __m512 b) {  // per 128 bits: [a0+a1, a2+a3, b0+b1, b2+b3]
  return _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// f(c) for each chunk c of [0, chunks). Each of at::get_num_threads() threads (at most one per
// chunk) owns a contiguous share and takes its chunks in order (one stream, as a fixed split), then
// takes what is left of the other shares: on a shared machine one thread often starts or runs late,
// and a fixed split waits for its whole share. Measured (2 Zen 4 cores, one row of x, machine
// shared, fastest call of 40 passes over 256 MB of copies, GB/s): [5632, 2048] fixed halves 54.9,
// one counter for all chunks 47.9, shares with stealing 53.3 (medians 37.7 / 36.7 / 39.8);
// [2048, 2048] 42.0 / 40.9 / 45.2. Which thread computes a chunk changes nothing in how it is computed.
template <typename F>
static void split_chunks(int64_t chunks, const F& f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
    return;
  }
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[threads]);  // next chunk of each share
  for (int64_t t = 0; t < threads; ++t) next[t] = chunks * t / threads;
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t) {
    for (int64_t i = 0; i < threads; ++i) {  // its own share first, then the others' leftovers
      const int64_t t = (first + i) % threads, stop = chunks * (t + 1) / threads;
      for (int64_t c; (c = next[t].fetch_add(1, std::memory_order_relaxed)) < stop;) f(c);
    }
  });
}

// f(part, begin, end) over chunks of `chunk` rows of each part's [0, rows[part]): the rows of one
// matrix, or of several that meet the same x (q, k and v; gate and up) in one parallel region, so
// that one call pays the fixed costs once (split_chunks). A chunk never spans two parts; on one
// thread each part goes whole.
template <typename F>
static void split_parts(const std::vector<int64_t>& rows, int64_t chunk, const F& f) {
  std::vector<int64_t> first(rows.size() + 1, 0);  // each part's first chunk
  for (size_t p = 0; p < rows.size(); ++p) first[p + 1] = first[p] + (rows[p] + chunk - 1) / chunk;
  if (std::min<int64_t>(at::get_num_threads(), first.back()) <= 1) {  // one thread: each part whole
    for (size_t p = 0; p < rows.size(); ++p)
      if (rows[p] > 0) f(int64_t(p), int64_t(0), rows[p]);
    return;
  }
  split_chunks(first.back(), [&](int64_t c) {
    const int64_t p = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t begin = (c - first[p]) * chunk;
    f(p, begin, std::min(rows[p], begin + chunk));
  });
}
