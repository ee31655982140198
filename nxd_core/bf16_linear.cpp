// y = x W^T for bfloat16 x [M, K] (a few rows) and W [N, K]: the matrix-vector product of decoding.
//
// Why: decoding reads every weight once per token, so its speed is memory bandwidth. ATen's bf16
// product for a few rows stays well below it (on AVX2 it has no native bf16 instructions at all).
// Here each weight row is streamed once and meets every row of x while it sits in L1; on the
// AVX512_BF16 path a few weight rows at a time share each load of x.
//
// Three SIMD paths in one object, chosen at run time (cpu_kernels.py reads the CPU's flags and
// NXD_BF16_KERNEL, then calls bf16_linear_set_isa):
//   avx2        AVX2+FMA: bf16 widened to fp32 by interleaving with zeros, 8-lane FMAs (the file's
//               baseline flags)
//   avx512      AVX-512F/BW/VL: bf16 widened by a shift, 16-lane FMAs, K tails by masked loads
//   avx512bf16  AVX512_BF16: _mm512_dpbf16_ps on x and W as they are (bf16 pairs), 32 per instruction
// All accumulate in fp32 and round once to bf16, like ATen's bf16 GEMM.
//
// Row invariance (the serving engine and speculative decoding rely on it): output [m, n] is
// computed by the same sequence of operations whatever M is and however N is split over threads:
// every (n, m) pair has its own U accumulators, the same k steps, tails and reduction order, and
// threads split N only, never K.
//
// Threads split N in chunks of rows (split_parts): each streams its own share, then takes the chunks
// another thread has not reached: on a shared machine one thread often starts or runs late, and a
// fixed split waits for its whole share. Which thread computes a row changes nothing in how it is computed.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "cpu_common.h"
#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>


// ---- AVX2 + FMA: 8 lanes; x widened to fp32 rows of stride xs (zero-padded), permuted per block --
//
// A 32-byte load of 16 bf16 weights becomes two fp32 vectors by interleaving with zeros (one
// instruction each, no shifts): elements {0-3, 8-11} and {4-7, 12-15}. x is stored once in that
// same order (x_order), so each product pairs the right weight and input.

static inline void widen16(const uint16_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(_mm256_setzero_si256(), v));
  hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(_mm256_setzero_si256(), v));
}

// One weight row against MR rows of x; 4 accumulators per x row whatever MR is (row invariance).
template <int MR>
static inline void dot_avx2(const uint16_t* w, int64_t K, const float* x, int64_t xs, float* out) {
  __m256 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_setzero_ps();
  __m256 wv[4];
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    widen16(w + k, wv[0], wv[1]);
    widen16(w + k + 16, wv[2], wv[3]);
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 4; ++u) acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * xs + k + 8 * u), acc[m][u]);
  }
  for (; k < K; k += 16) {  // the rest, 16 at a time; the last weights zero-padded (x's padding is zeros)
    uint16_t tail[16] = {0};
    const uint16_t* src = w + k;
    if (K - k < 16) src = static_cast<const uint16_t*>(std::memcpy(tail, w + k, (K - k) * sizeof(uint16_t)));
    widen16(src, wv[0], wv[1]);
    for (int m = 0; m < MR; ++m)
      for (int u = 0; u < 2; ++u) acc[m][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(x + m * xs + k + 8 * u), acc[m][u]);
  }
  for (int m = 0; m < MR; ++m)
    out[m] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
}

// ---- AVX-512F/BW/VL: 16 lanes, x widened to fp32 (stride xs) ---------------------------------

#define NXD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define NXD_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

NXD_AVX512 static inline __m512 widen_bf16x16(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// Not inlined into the (AVX2) driver: one call per weight row and tile of x, nothing next to the K loop.
template <int MR>
NXD_AVX512 static void dot_avx512(const uint16_t* w, int64_t K, const float* x, int64_t xs, float* out) {
  constexpr int U = 2;
  __m512 acc[MR][U];
  for (int m = 0; m < MR; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U)
    for (int u = 0; u < U; ++u) {
      const __m512 wv = widen_bf16x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16 * u)));
      for (int m = 0; m < MR; ++m) acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * xs + k + 16 * u), acc[m][u]);
    }
  for (; k < K; k += 16) {  // the rest, the last step masked (zeros beyond K)
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    const __m512 wv = widen_bf16x16(_mm256_maskz_loadu_epi16(mask, w + k));
    for (int m = 0; m < MR; ++m) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(mask, x + m * xs + k), acc[m][0]);
  }
  for (int m = 0; m < MR; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

// ---- AVX512_BF16: x as it is (bf16, stride xs = K), pairs of k per fp32 lane -----------------

NXD_AVX512BF16 static inline __m512bh load_bf16x32(__mmask32 mask, const uint16_t* p) {
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

// out[i] = the sum of v[i]'s 16 lanes for i < N (powers of two in one pass of shuffles, the steps
// in cpu_common.h) (a reduction each costs ~9 instructions, as many as 9 dot products: on rows of
// 256, half a tile's time). Each sum takes _mm512_reduce_add_ps's order, so an output has the same
// bits however many are reduced together.
template <int N>
NXD_AVX512BF16 static inline void lane_sums(const __m512* v, float* out) {
  constexpr int P = N >= 16 ? 16 : N >= 8 ? 8 : N >= 4 ? 4 : N >= 2 ? 2 : 1;  // the largest power of two <= N
  if constexpr (P != N) {  // 3, 6, 12 ...: a power of two, then the rest
    lane_sums<P>(v, out);
    lane_sums<N - P>(v + P, out + P);
  } else if constexpr (N == 1) {
    out[0] = _mm512_reduce_add_ps(v[0]);
  } else {
    constexpr int N1 = N / 2, N2 = N / 4 > 0 ? N / 4 : 1, N3 = N / 8 > 0 ? N / 8 : 1;
    __m512 h[N1], q[N2], p[N3];
    _Pragma("GCC unroll 8") for (int i = 0; i < N1; ++i) h[i] = halves_added(v[2 * i], v[2 * i + 1]);
    _Pragma("GCC unroll 4") for (int i = 0; i < N2; ++i) q[i] = quarters_added(h[2 * i], h[std::min(2 * i + 1, N1 - 1)]);
    _Pragma("GCC unroll 2") for (int i = 0; i < N3; ++i) p[i] = pairs_added(q[2 * i], q[std::min(2 * i + 1, N2 - 1)]);
    alignas(64) float lanes[16];
    _mm512_store_ps(lanes, neighbours_added(p[0], p[N3 - 1]));
    // 128-bit lane j, element c holds v[j + 4c]: c < N/4 (at least 1), j < min(N, 4)
    _Pragma("GCC unroll 16") for (int c = 0; c < N2; ++c)
      _Pragma("GCC unroll 4") for (int j = 0; j < (N < 4 ? N : 4); ++j) out[j + 4 * c] = lanes[4 * j + c];
  }
}

// vdpbf16ps: acc += w[2i] * x[2i] + w[2i+1] * x[2i+1] per lane; the products are exact in fp32,
// the sums round to nearest even, bf16 denormals count as zero.
//
// NR weight rows (K apart) against MR rows of x, out[m * NR + r]. Each of the NR x MR outputs has
// its own U accumulators, the same k steps and the same reduction whatever NR and MR are (row
// invariance). A tile of several weight rows loads each piece of x once for all of them: at 2+
// rows of x, one weight row at a time spent a load of x per product and ran at a third of the
// dot-product rate (W [2048, 2048] in cache, one core, 1 / 4 / 8 rows of x: 103 / 400 / 839 us one
// weight row at a time, 107 / 196 / 489 us in tiles). The unroll pragmas are needed: without them
// GCC 12 keeps acc in memory and stores every accumulator after each product.
template <int NR, int MR>
NXD_AVX512BF16 static void tile_avx512bf16(const uint16_t* w, int64_t K, int64_t ws, const uint16_t* x, int64_t xs, float* out) {
  constexpr int U = 2;
  constexpr __mmask32 all = ~__mmask32(0);
  __m512 acc[U][NR * MR];  // [u][r * MR + m]
  for (int u = 0; u < U; ++u)
    _Pragma("GCC unroll 32") for (int i = 0; i < NR * MR; ++i) acc[u][i] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U)
    _Pragma("GCC unroll 2") for (int u = 0; u < U; ++u) {
      __m512bh xv[MR];
      _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) xv[m] = load_bf16x32(all, x + m * xs + k + 32 * u);
      _Pragma("GCC unroll 32") for (int r = 0; r < NR; ++r) {
        const __m512bh wv = load_bf16x32(all, w + r * ws + k + 32 * u);
        _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) acc[u][r * MR + m] = _mm512_dpbf16_ps(acc[u][r * MR + m], wv, xv[m]);
      }
    }
  if (k < K) {  // the rest, in steps of 32, the last one masked (zeros beyond K)
    __m512 tail[NR * MR];
    _Pragma("GCC unroll 32") for (int i = 0; i < NR * MR; ++i) tail[i] = acc[0][i];
    for (; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? all : __mmask32((1u << (K - k)) - 1);
      __m512bh xv[MR];
      _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) xv[m] = load_bf16x32(mask, x + m * xs + k);
      _Pragma("GCC unroll 32") for (int r = 0; r < NR; ++r) {
        const __m512bh wv = load_bf16x32(mask, w + r * ws + k);
        _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) tail[r * MR + m] = _mm512_dpbf16_ps(tail[r * MR + m], wv, xv[m]);
      }
    }
    _Pragma("GCC unroll 32") for (int i = 0; i < NR * MR; ++i) acc[0][i] = tail[i];
  }
  __m512 sums[NR * MR];
  _Pragma("GCC unroll 32") for (int i = 0; i < NR * MR; ++i) sums[i] = _mm512_add_ps(acc[0][i], acc[1][i]);
  float total[NR * MR];
  lane_sums<NR * MR>(sums, total);
  _Pragma("GCC unroll 32") for (int r = 0; r < NR; ++r)
    _Pragma("GCC unroll 32") for (int m = 0; m < MR; ++m) out[m * NR + r] = total[r * MR + m];
}

// NR rows of W, `apart` rows apart from row n, against all M rows of x: MR rows of x at a time, then
// what is left in tiles of 4, 3, 2 and 1 (only those smaller than MR).
template <int NR, int MR>
static void tile_rows_avx512bf16(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, int64_t N, int64_t n,
                                 int64_t apart, uint16_t* out) {
  float part[NR * MR];
  int64_t m = 0;
  auto store = [&](int mr) {
    for (int i = 0; i < mr; ++i)
      for (int r = 0; r < NR; ++r) out[(m + i) * N + n + r * apart] = float_to_bf16(part[i * NR + r]);
    m += mr;
  };
  const uint16_t* row = w + n * K;
  while (M - m >= MR) tile_avx512bf16<NR, MR>(row, K, apart * K, x + m * K, K, part), store(MR);
  if constexpr (MR > 4)
    if (M - m >= 4) tile_avx512bf16<NR, 4>(row, K, apart * K, x + m * K, K, part), store(4);
  if constexpr (MR > 3)
    if (M - m == 3) tile_avx512bf16<NR, 3>(row, K, apart * K, x + m * K, K, part), store(3);
  if constexpr (MR > 2)
    if (M - m >= 2) tile_avx512bf16<NR, 2>(row, K, apart * K, x + m * K, K, part), store(2);
  if (M - m == 1) tile_avx512bf16<NR, 1>(row, K, apart * K, x + m * K, K, part), store(1);
}

// Rows [begin, end) of W, TR at a time: the rows of a tile are a TR-th of the range apart (tiles of
// adjacent rows read memory slower: one row of x, [2048, 2048], 26.9 GB/s against 33.9 for one row
// at a time, slow spell; rows apart read alike), then the rows left over one at a time.
template <int TR, int MR>
static void rows_avx512bf16(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, int64_t N, int64_t begin,
                            int64_t end, uint16_t* out) {
  const int64_t apart = (end - begin) / TR;
  for (int64_t i = 0; i < apart; ++i) tile_rows_avx512bf16<TR, MR>(w, K, x, M, N, begin + i, apart, out);
  for (int64_t n = begin + TR * apart; n < end; ++n) tile_rows_avx512bf16<1, MR>(w, K, x, M, N, n, 0, out);
}

// The tile of NR weight rows x MR rows of x for M rows of x (speculative verification: k + 1; a
// serving batch). One tile over every row of x reads each weight once per call and each piece of x
// once per NR weights; NR * MR accumulator pairs must fit in 32 registers with the loads. Measured
// (one Zen 4 core, W [256, 2048] in cache, GMAC/s, the previous tiles of 4, 2 and 1 rows of x ->
// these): 3 rows 57 -> 94 (4 x 3), 5 rows 64 -> 82 (2 x 5), 6 rows 68 -> 80 (2 x 6), 7 rows
// 62 -> 64 (4 x 3 twice, then 1); 4 and 8 rows were best as they were (3 x 4; at K 256 all tile
// shapes came within 10%: short rows spend their time in the reductions). From memory, two threads,
// 1.1B shapes (benchmarks/bf16_kernel.py --rows 3 5 6 8, slow memory spell): 3 rows 9-18% faster,
// 5 rows 0-15%, 6 and 8 rows the same. Which tile computes an output changes nothing in how it is
// computed (row invariance).
static void rows_for(const uint16_t* w, int64_t K, const uint16_t* x, int64_t M, int64_t N, int64_t begin, int64_t end,
                     uint16_t* out) {
  if (M == 3 || M == 7)
    rows_avx512bf16<4, 3>(w, K, x, M, N, begin, end, out);
  else if (M == 5)
    rows_avx512bf16<2, 5>(w, K, x, M, N, begin, end, out);
  else if (M == 6)
    rows_avx512bf16<2, 6>(w, K, x, M, N, begin, end, out);
  else if (M < 3)  // 4 weight rows: 1 row of x has 8 chains of dot products, not 2 (short rows ran 10-25% faster)
    rows_avx512bf16<4, 2>(w, K, x, M, N, begin, end, out);
  else if (K >= 1024)  // 3 weight rows: long rows of x leave L1, and each load of x serves 3 rows, not 2
    rows_avx512bf16<3, 4>(w, K, x, M, N, begin, end, out);
  else  // short rows: the 8-output tile's sums are reduced in one pass, 12 in two
    rows_avx512bf16<2, 4>(w, K, x, M, N, begin, end, out);
}

// ---- driver -----------------------------------------------------------------------------------

// Where input k goes in a block of `block` (16: AVX2) so that it meets its weight after widen16:
// groups of 4 alternate between the low and the high half of the block (0: x's own order).
static inline int64_t x_order(int64_t k, int64_t block) {
  if (block == 0) return k;
  const int64_t base = k - k % block, i = k % block, group = i / 4, half = group % 2;
  return base + half * (block / 2) + (group / 2) * 4 + i % 4;
}

enum Isa { kAvx2 = 0, kAvx512 = 1, kAvx512Bf16 = 2 };
static const char* const kIsaNames[] = {"avx2", "avx512", "avx512bf16"};
static Isa g_isa = kAvx2;  // set once by cpu_kernels.prepare() (and by tests), read by every call

// Rows [begin, end) of W: each row streamed once against all M rows of x, MR at a time. MR only
// groups rows of x; it never changes how one (n, m) pair is summed.
template <typename X, int MaxMR, void (*Dot1)(const uint16_t*, int64_t, const X*, int64_t, float*),
          void (*Dot2)(const uint16_t*, int64_t, const X*, int64_t, float*),
          void (*Dot4)(const uint16_t*, int64_t, const X*, int64_t, float*),
          void (*DotMax)(const uint16_t*, int64_t, const X*, int64_t, float*)>
static void rows(const uint16_t* w, int64_t K, const X* x, int64_t xs, int64_t M, int64_t N, int64_t begin, int64_t end,
                 uint16_t* out) {
  float part[MaxMR];
  for (int64_t n = begin; n < end; ++n) {
    const uint16_t* row = w + n * K;
    int64_t m = 0;
    for (; m + MaxMR <= M; m += MaxMR) {
      DotMax(row, K, x + m * xs, xs, part);
      for (int i = 0; i < MaxMR; ++i) out[(m + i) * N + n] = float_to_bf16(part[i]);
    }
    if (MaxMR > 4 && M - m >= 4) {
      Dot4(row, K, x + m * xs, xs, part);
      for (int i = 0; i < 4; ++i) out[(m + i) * N + n] = float_to_bf16(part[i]);
      m += 4;
    }
    if (MaxMR > 2 && M - m >= 2) {
      Dot2(row, K, x + m * xs, xs, part);
      for (int i = 0; i < 2; ++i) out[(m + i) * N + n] = float_to_bf16(part[i]);
      m += 2;
    }
    if (M - m == 1) {
      Dot1(row, K, x + m * xs, xs, part);
      out[m * N + n] = float_to_bf16(part[0]);
    }
  }
}

// A chunk is at least 64 output features and 128 KB of weights: below that a second thread costs
// more than it saves (2 Zen 4 cores, one row of x, fastest call: W [256, 256] 4.1 us on one thread,
// 5.7 us on two; [256, 688] 9.7 us against 6.8 us).
constexpr int64_t kGrain = 64, kTaskBytes = 128 << 10;

// x [M, K] against the weights ws[0..P) (each [N_p, K]) into out [M, sum N_p]: part p's outputs
// are columns [offset_p, offset_p + N_p). One call for q, k and v (or gate and up) pays the fixed
// costs once: the threads' start and finish, and x's preparation.
static at::Tensor linear_parts(const at::Tensor& x_in, at::TensorList ws) {
  TORCH_CHECK(!ws.empty(), "bf16_linear: no weights");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "bf16_linear: x bfloat16 [M, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1);
  std::vector<int64_t> part_rows, offset;
  int64_t total = 0;
  for (const at::Tensor& w : ws) {
    TORCH_CHECK(w.dim() == 2 && w.size(1) == K, "bf16_linear: x [M, K] and w [N, K]");
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "bf16_linear: bfloat16 tensors, w contiguous");
    part_rows.push_back(w.size(0));
    offset.push_back(total);
    total += w.size(0);
  }
  const at::Tensor xb = x_in.contiguous();
  const int64_t chunk = std::max(kGrain, kTaskBytes / std::max<int64_t>(1, 2 * K));
  at::Tensor out = at::empty({M, total}, xb.options());
  if (M == 0 || total == 0) return out;
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(xb.data_ptr<at::BFloat16>());
  std::vector<const uint16_t*> wps;
  for (const at::Tensor& w : ws) wps.push_back(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // Part p's rows write into out's columns from offset[p]; out's rows are `total` apart.
  if (g_isa == kAvx512Bf16) {
    split_parts(part_rows, chunk, [&](int64_t p, int64_t begin, int64_t end) {
      rows_for(wps[p], K, xs, M, total, begin, end, op + offset[p]);
    });
    return out;
  }
  // x widened to fp32 once (a few KB per row) in the order the weights are widened in (x_order), in
  // a tensor: 64-byte aligned, rows zero-padded to whole blocks, and 128 bytes more where rows would
  // be a multiple of 4 KB apart (their loads would alias in L1).
  const int64_t block = g_isa == kAvx512 ? 0 : 16;  // AVX-512 widens in place: x in its own order
  int64_t stride = (K + 31) / 32 * 32;
  if (stride % 1024 == 0) stride += 32;
  at::Tensor xw = at::zeros({M, stride}, xb.options().dtype(at::kFloat));
  float* xf = xw.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * stride + x_order(k, block)] = bf16_to_float(xs[m * K + k]);
  if (g_isa == kAvx512) {  // 8 rows of x x 2 accumulators: 16 of the 32 zmm registers
    split_parts(part_rows, chunk, [&](int64_t p, int64_t begin, int64_t end) {
      rows<float, 8, dot_avx512<1>, dot_avx512<2>, dot_avx512<4>, dot_avx512<8>>(wps[p], K, xf, stride, M, total, begin, end, op + offset[p]);
    });
  } else {
    split_parts(part_rows, chunk, [&](int64_t p, int64_t begin, int64_t end) {
      rows<float, 2, dot_avx2<1>, dot_avx2<2>, dot_avx2<2>, dot_avx2<2>>(wps[p], K, xf, stride, M, total, begin, end, op + offset[p]);
    });
  }
  return out;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) { return linear_parts(x, {w}); }

// x [M, K] against several weights at once: [M, sum of their rows], each weight's outputs in turn.
at::Tensor bf16_linear_many(const at::Tensor& x, at::TensorList ws) { return linear_parts(x, ws); }

// The CPU itself is asked too (its flags as the OS reports them could be wrong in a test's
// monkeypatch, never in here): an instruction the CPU lacks would kill the process.
static bool cpu_supports(Isa isa) {
  switch (isa) {
    case kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    case kAvx512Bf16:
      return cpu_supports(kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
}

std::string bf16_linear_set_isa(const std::string& name) {
  for (int i = 0; i < 3; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK(cpu_supports(Isa(i)), "bf16_linear_set_isa: this CPU has no ", name,
                  "; choose one of cpu_kernels.available_paths()");
      g_isa = Isa(i);
      return name;
    }
  TORCH_CHECK(false, "bf16_linear_set_isa: unknown path '", name, "' (avx2, avx512 or avx512bf16)");
}

std::string bf16_linear_isa() { return kIsaNames[g_isa]; }

// Registered with the dispatcher (not pybind): a call costs what any aten op costs.
TORCH_LIBRARY(nxd, m) {
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("bf16_linear_many(Tensor x, Tensor[] ws) -> Tensor");
  m.def("bf16_linear_set_isa(str isa) -> str", &bf16_linear_set_isa);
  m.def("bf16_linear_isa() -> str", &bf16_linear_isa);
}
TORCH_LIBRARY_IMPL(nxd, CPU, m) {
  m.impl("bf16_linear", &bf16_linear);
  m.impl("bf16_linear_many", &bf16_linear_many);
}
