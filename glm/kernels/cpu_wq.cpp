// Weight-only INT4/INT8 linear for x86 CPUs, in the "tile16" layout of glm/kernels/cpu_wq.py.
//
// Algorithm
// ---------
// Decoding multiplies a few rows of x by a large weight that is read once per step, so the kernel must stream the
// packed weight at memory speed and reuse every loaded byte for all the rows of x (M <= 8 in one pass).
//
// Layout ("tile16", built in Python by `pack_tiles`): output channels are grouped 16 at a time; a tile of 16 rows
// is stored as consecutive 64-byte chunks along K. In a chunk, byte 4*r + j belongs to row r of the tile:
//   INT4  low nibble = u[k0 + j], high nibble = u[k0 + 4 + j]   (8 values of K per chunk), u = q + 8 in [0, 15]
//   INT8  the byte    = u[k0 + j]                               (4 values of K per chunk), u = q + 128 in [1, 255]
// So a 32-bit lane r of a 512-bit register holds 4 consecutive K values of row r: one `vpdpbusd` multiplies them
// by 4 bytes of x broadcast to every lane and adds the 4 products into that row's int32 sum. K is padded to a
// multiple of 32 (the activation block) and N to a multiple of 16 with q = 0.
//
// Two modes:
//   exact  x stays in float: the weights are turned into float in registers and multiplied in fp32 (fp32
//          accumulation per block of 32, then the scale). This is `F.linear(x, q * scale, b)` up to summation order.
//   fast   ggml's q4_0 x q8_0 scheme: each block of 32 values of a row of x is quantized to int8 with one fp32 scale
//          d = max|x| / 127, the dot products run on integers (`vpdpbusd`; `vpmaddubsw` without VNNI), and each
//          block's int32 sum is scaled once. The offset of the unsigned weights (u = q + 8 or q + 128) is removed
//          by starting each block's sum at -offset * sum(x_q).
// Grouped scales (group a multiple of 32) are applied per block; per-channel scales once, at the end.
//
// Threads: output tiles are split over torch's intra-op threads (at::parallel_for, OpenMP).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifndef GLM_CPU_NS  // the op namespace; the Python loader names it after the -march value
#define GLM_CPU_NS glm_cpu_native
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define GLM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define GLM_AVX2 1
#endif

namespace {

constexpr int kTileN = 16;  // output rows per tile
constexpr int kBlockK = 32;  // K values per activation block (and per scale group at least)
constexpr int kChunk = 64;  // bytes per chunk
constexpr int kMaxRows = 8;  // rows of x per pass over the weights
constexpr int64_t kTilesPerRun = 8;  // tiles a thread claims at a time (128 output channels)
// How far ahead of the block being multiplied its tile is prefetched. The hardware prefetcher alone leaves the
// integer units waiting (docs/benchmarks.md: 10-20% of a decode step at 1 and 8 rows).
constexpr int64_t kPrefetchAhead = 2048;

// Prefetches the 64-byte chunks of one block of 32 K values, `kPrefetchAhead` bytes past `block`. Past the end of
// the weight it fetches nothing useful, and a prefetch never faults.
template <int BITS>
inline void prefetch_block(const uint8_t* block) {
  for (int i = 0; i < BITS; ++i) __builtin_prefetch(block + kPrefetchAhead + i * kChunk);  // BITS chunks a block
}

const char* isa_name() {
#if defined(GLM_AVX512)
  return "avx512-vnni";
#elif defined(GLM_AVX2) && defined(__AVXVNNI__)
  return "avx2-vnni";
#elif defined(GLM_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}

// Offset of the stored unsigned weights that the fast path's integer sums must remove (0: the path uses signed q).
template <int BITS>
constexpr int32_t fast_offset() {
#if defined(GLM_AVX2) && !defined(__AVXVNNI__)
  if (BITS == 8) return 0;  // vpmaddubsw would saturate on u8 up to 255: this path multiplies |q| by sign(q) * x
#endif
  return BITS == 4 ? 8 : 128;
}

// ------------------------------------------------------------------------------------------------ activations

struct Acts {
  int64_t m = 0, kp = 0, nb = 0;
  const float* xf = nullptr;  // exact: [m, kp] fp32
  std::vector<float> xf_buf;
  std::vector<int8_t> xq;  // fast: [m, kp] int8
  std::vector<float> xd;  // fast: [m, nb] block scales
  std::vector<int32_t> xc;  // fast: [m, nb] -offset * sum of the block's int8 values
};

template <typename T>
void to_float_rows(const T* x, int64_t m, int64_t k, int64_t kp, float* out) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) out[i * kp + j] = static_cast<float>(x[i * k + j]);
    for (int64_t j = k; j < kp; ++j) out[i * kp + j] = 0.f;
  }
}

void float_rows(const at::Tensor& x, int64_t kp, Acts& a) {
  const int64_t m = x.size(0), k = x.size(1);
  if (x.scalar_type() == at::kFloat && k == kp) {
    a.xf = x.data_ptr<float>();
    return;
  }
  a.xf_buf.resize(m * kp);
  switch (x.scalar_type()) {
    case at::kFloat: to_float_rows(x.data_ptr<float>(), m, k, kp, a.xf_buf.data()); break;
    case at::kBFloat16: to_float_rows(x.data_ptr<c10::BFloat16>(), m, k, kp, a.xf_buf.data()); break;
    case at::kHalf: to_float_rows(x.data_ptr<c10::Half>(), m, k, kp, a.xf_buf.data()); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16");
  }
  a.xf = a.xf_buf.data();
}

// Quantizes each block of 32 values: d = max|x| / 127, q = round(x / d) (to nearest even), as ggml's q8_0.
void quantize_rows(Acts& a, int32_t offset) {
  a.xq.resize(a.m * a.kp);
  a.xd.resize(a.m * a.nb);
  a.xc.resize(a.m * a.nb);
  // Threads only for prefill-sized inputs: a parallel region costs more than quantizing a few rows.
  at::parallel_for(0, a.m * a.nb, 2048, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = a.xf + (b / a.nb) * a.kp + (b % a.nb) * kBlockK;
      int8_t* q = a.xq.data() + (b / a.nb) * a.kp + (b % a.nb) * kBlockK;
      float amax = 0.f, nonfinite = 0.f;
      for (int i = 0; i < kBlockK; ++i) {
        amax = std::max(amax, std::fabs(x[i]));
        nonfinite += x[i] * 0.f;  // NaN if any value is inf or NaN
      }
      if (nonfinite != 0.f) {  // NaN: let the outputs be NaN too, as a float matmul's would (the NaN rule needs it)
        std::fill(q, q + kBlockK, 0);
        a.xd[b] = std::numeric_limits<float>::quiet_NaN();
        a.xc[b] = 0;
        continue;
      }
      const float d = amax / 127.f;
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int i = 0; i < kBlockK; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(x[i] * inv));
        q[i] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += q[i];
      }
      a.xd[b] = d;
      a.xc[b] = -offset * sum;
    }
  });
}

// What one tile needs besides the weights.
struct TileArgs {
  const Acts* a;
  int64_t m0;  // first row of x
  const float* gscale;  // grouped: this tile's [groups, 16] scales; nullptr for per-channel
  int64_t blocks_per_group;
};

// ------------------------------------------------------------------------------------------------ AVX-512 VNNI
#if defined(GLM_AVX512)

constexpr int kLanes = 16;

// Independent accumulators per row of x: enough chains to hide the latency of the FMA / vpdpbusd units when the
// rows alone do not (at MR = 1, one chain would make the kernel latency-bound, not bandwidth-bound).
template <int MR>
constexpr int chains() {
  return MR <= 2 ? 4 : (MR <= 4 ? 2 : 1);  // MR * chains >= 4, and at MR = 8 no spills out of the 32 registers
}

template <int MR, int BITS>
inline void exact_tile(const uint8_t* w, const TileArgs& t, __m512 (&out)[MR][1]) {
  constexpr int A = chains<MR>();
  const Acts& a = *t.a;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const float* x = a.xf + t.m0 * a.kp;
  // INT4: vpermps looks a nibble up in a table of the 16 values q = u - 8 (it reads the low 4 bits of each lane).
  const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  // INT8: XOR 0x80 turns u = q + 128 back into two's complement q; vpshufb moves byte j of each lane to the top byte
  // (zeros below), so the lane reads q * 2^24 as an int32, converted exactly. The 2^-24 is applied per block.
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i top[4];
  for (int j = 0; j < 4; ++j)
    top[j] = _mm512_broadcast_i32x4(_mm_setr_epi32(j << 24 | 0x808080, (4 + j) << 24 | 0x808080,
                                                   (8 + j) << 24 | 0x808080, (12 + j) << 24 | 0x808080));
  for (int64_t b = 0; b < a.nb; ++b) {
    __m512 bacc[MR][A];
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < A; ++i) bacc[m][i] = _mm512_setzero_ps();
    const float* xb = x + b * kBlockK;
    prefetch_block<BITS>(w + b * BITS * kChunk);
    if constexpr (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(w + (b * 4 + c) * kChunk);
#pragma GCC unroll 8
        for (int h = 0; h < 8; ++h) {  // nibble h of each lane: byte h / 2, low (k = c*8 + h/2) or high (+4)
          const int kk = c * 8 + h / 2 + 4 * (h % 2);
          const __m512 wv = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * h), lut);
          for (int m = 0; m < MR; ++m)
            bacc[m][h % A] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[m * a.kp + kk]), bacc[m][h % A]);
        }
      }
    } else {
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(w + (b * 8 + c) * kChunk), flip);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m512 wv = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, top[j]));
          for (int m = 0; m < MR; ++m)
            bacc[m][j % A] = _mm512_fmadd_ps(wv, _mm512_set1_ps(xb[m * a.kp + c * 4 + j]), bacc[m][j % A]);
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int i = 1; i < A; ++i) bacc[m][0] = _mm512_add_ps(bacc[m][0], bacc[m][i]);
      if constexpr (BITS == 8) bacc[m][0] = _mm512_mul_ps(bacc[m][0], _mm512_set1_ps(0x1p-24f));
    }
    if (t.gscale) {
      const __m512 s = _mm512_loadu_ps(t.gscale + (b / t.blocks_per_group) * kTileN);
      for (int m = 0; m < MR; ++m) acc[m] = _mm512_fmadd_ps(bacc[m][0], s, acc[m]);
    } else {
      for (int m = 0; m < MR; ++m) acc[m] = _mm512_add_ps(acc[m], bacc[m][0]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m][0] = acc[m];
}

template <int MR, int BITS>
inline void fast_tile(const uint8_t* w, const TileArgs& t, __m512 (&out)[MR][1]) {
  constexpr int A = chains<MR>();
  const Acts& a = *t.a;
  __m512 acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = _mm512_setzero_ps();
  const int8_t* x = a.xq.data() + t.m0 * a.kp;
  const float* xd = a.xd.data() + t.m0 * a.nb;
  const int32_t* xc = a.xc.data() + t.m0 * a.nb;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < a.nb; ++b) {
    __m512i iacc[MR][A];
    for (int m = 0; m < MR; ++m) {
      iacc[m][0] = _mm512_set1_epi32(xc[m * a.nb + b]);
      for (int i = 1; i < A; ++i) iacc[m][i] = _mm512_setzero_si512();
    }
    const int8_t* xb = x + b * kBlockK;
    prefetch_block<BITS>(w + b * BITS * kChunk);
    if constexpr (BITS == 4) {
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(w + (b * 4 + c) * kChunk);
        const __m512i lo = _mm512_and_si512(v, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int m = 0; m < MR; ++m) {
          int32_t x0, x1;
          std::memcpy(&x0, xb + m * a.kp + c * 8, 4);
          std::memcpy(&x1, xb + m * a.kp + c * 8 + 4, 4);
          iacc[m][(2 * c) % A] = _mm512_dpbusd_epi32(iacc[m][(2 * c) % A], lo, _mm512_set1_epi32(x0));
          iacc[m][(2 * c + 1) % A] = _mm512_dpbusd_epi32(iacc[m][(2 * c + 1) % A], hi, _mm512_set1_epi32(x1));
        }
      }
    } else {
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_loadu_si512(w + (b * 8 + c) * kChunk);
        for (int m = 0; m < MR; ++m) {
          int32_t x0;
          std::memcpy(&x0, xb + m * a.kp + c * 4, 4);
          iacc[m][c % A] = _mm512_dpbusd_epi32(iacc[m][c % A], v, _mm512_set1_epi32(x0));
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int i = 1; i < A; ++i) iacc[m][0] = _mm512_add_epi32(iacc[m][0], iacc[m][i]);
    if (t.gscale) {
      const __m512 s = _mm512_loadu_ps(t.gscale + (b / t.blocks_per_group) * kTileN);
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m][0]), _mm512_mul_ps(s, _mm512_set1_ps(xd[m * a.nb + b])),
                                 acc[m]);
    } else {
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m][0]), _mm512_set1_ps(xd[m * a.nb + b]), acc[m]);
    }
  }
  for (int m = 0; m < MR; ++m) out[m][0] = acc[m];
}

using Vec = __m512;
constexpr int kVecs = 1;  // registers per tile row

inline void vec_store(float* dst, const float* scale, const float* bias, Vec v, int valid) {
  if (scale) v = _mm512_mul_ps(v, _mm512_loadu_ps(scale));
  if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias));
  _mm512_mask_storeu_ps(dst, static_cast<__mmask16>((1u << valid) - 1), v);
}

#endif  // GLM_AVX512

// ------------------------------------------------------------------------------------------------ AVX2 (+ VNNI)
#if defined(GLM_AVX2)

constexpr int kLanes = 8;

// A 64-byte chunk holds rows 0-7 of the tile in its first 32 bytes and rows 8-15 in the next: each half of the
// tile is computed by its own pair of 256-bit registers.
template <int MR, int BITS>
inline void exact_tile(const uint8_t* w, const TileArgs& t, __m256 (&out)[MR][2]) {
  const Acts& a = *t.a;
  const __m256i flip = _mm256_set1_epi8(BITS == 4 ? static_cast<char>(0x88) : static_cast<char>(0x80));
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    const float* x = a.xf + t.m0 * a.kp;
    for (int64_t b = 0; b < a.nb; ++b) {
      __m256 bacc[MR];
      for (int m = 0; m < MR; ++m) bacc[m] = _mm256_setzero_ps();
      const float* xb = x + b * kBlockK;
      constexpr int chunks = BITS == 4 ? 4 : 8;
      prefetch_block<BITS>(w + b * chunks * kChunk);
      for (int c = 0; c < chunks; ++c) {
        const __m256i v = _mm256_xor_si256(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b * chunks + c) * kChunk + half * 32)), flip);
        if constexpr (BITS == 4) {
#pragma GCC unroll 8
          for (int h = 0; h < 8; ++h) {
            const int kk = c * 8 + h / 2 + 4 * (h % 2);
            const int shift = 28 - 8 * (h / 2) - 4 * (h % 2);
            const __m256 wv = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, shift), 28));
            for (int m = 0; m < MR; ++m) bacc[m] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xb[m * a.kp + kk]), bacc[m]);
          }
        } else {
#pragma GCC unroll 4
          for (int j = 0; j < 4; ++j) {
            const __m256 wv = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * j), 24));
            for (int m = 0; m < MR; ++m)
              bacc[m] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xb[m * a.kp + c * 4 + j]), bacc[m]);
          }
        }
      }
      if (t.gscale) {
        const __m256 s = _mm256_loadu_ps(t.gscale + (b / t.blocks_per_group) * kTileN + half * 8);
        for (int m = 0; m < MR; ++m) acc[m] = _mm256_fmadd_ps(bacc[m], s, acc[m]);
      } else {
        for (int m = 0; m < MR; ++m) acc[m] = _mm256_add_ps(acc[m], bacc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) out[m][half] = acc[m];
  }
}

// Sum of u8 a times s8 b over each group of 4 bytes, added to the int32 lanes of acc.
inline __m256i dot4(__m256i acc, __m256i a, __m256i b) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, a, b);
#else
  // Pairs of u8 x s8 into int16 (no saturation: |a| <= 127 or a <= 15 here), then pairs of int16 into int32.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1)));
#endif
}

template <int MR, int BITS>
inline void fast_tile(const uint8_t* w, const TileArgs& t, __m256 (&out)[MR][2]) {
  const Acts& a = *t.a;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const int8_t* x = a.xq.data() + t.m0 * a.kp;
  const float* xd = a.xd.data() + t.m0 * a.nb;
  const int32_t* xc = a.xc.data() + t.m0 * a.nb;
  for (int half = 0; half < 2; ++half) {
    __m256 acc[MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < a.nb; ++b) {
      __m256i iacc[MR];
      for (int m = 0; m < MR; ++m) iacc[m] = _mm256_set1_epi32(xc[m * a.nb + b]);
      const int8_t* xb = x + b * kBlockK;
      constexpr int chunks = BITS == 4 ? 4 : 8;
      prefetch_block<BITS>(w + b * chunks * kChunk);
#pragma GCC unroll 8
      for (int c = 0; c < chunks; ++c) {
        const __m256i v =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b * chunks + c) * kChunk + half * 32));
        if constexpr (BITS == 4) {
          const __m256i lo = _mm256_and_si256(v, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          for (int m = 0; m < MR; ++m) {
            int32_t x0, x1;
            std::memcpy(&x0, xb + m * a.kp + c * 8, 4);
            std::memcpy(&x1, xb + m * a.kp + c * 8 + 4, 4);
            iacc[m] = dot4(iacc[m], lo, _mm256_set1_epi32(x0));
            iacc[m] = dot4(iacc[m], hi, _mm256_set1_epi32(x1));
          }
        } else {
#if defined(__AVXVNNI__)
          const __m256i wa = v;  // u8 = q + 128; the offset is removed through xc
#else
          const __m256i q = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
          const __m256i wa = _mm256_abs_epi8(q);
#endif
          for (int m = 0; m < MR; ++m) {
            int32_t x0;
            std::memcpy(&x0, xb + m * a.kp + c * 4, 4);
            __m256i xv = _mm256_set1_epi32(x0);
#if !defined(__AVXVNNI__)
            xv = _mm256_sign_epi8(xv, q);
#endif
            iacc[m] = dot4(iacc[m], wa, xv);
          }
        }
      }
      if (t.gscale) {
        const __m256 s = _mm256_loadu_ps(t.gscale + (b / t.blocks_per_group) * kTileN + half * 8);
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_mul_ps(s, _mm256_set1_ps(xd[m * a.nb + b])),
                                   acc[m]);
      } else {
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), _mm256_set1_ps(xd[m * a.nb + b]), acc[m]);
      }
    }
    for (int m = 0; m < MR; ++m) out[m][half] = acc[m];
  }
}

using Vec = __m256;
constexpr int kVecs = 2;

inline void vec_store(float* dst, const float* scale, const float* bias, Vec v, int valid) {
  if (scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(scale));
  if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias));
  if (valid >= 8) {
    _mm256_storeu_ps(dst, v);
  } else if (valid > 0) {
    alignas(32) float tmp[8];
    _mm256_store_ps(tmp, v);
    std::memcpy(dst, tmp, valid * sizeof(float));
  }
}

#endif  // GLM_AVX2

// ------------------------------------------------------------------------------------------------ generic C++
#if !defined(GLM_AVX512) && !defined(GLM_AVX2)

constexpr int kLanes = 16;
struct Vec {
  float v[16];
};
constexpr int kVecs = 1;

template <int BITS>
inline int32_t weight_u(const uint8_t* chunk, int lane, int j) {  // j-th K value of the chunk for this lane
  if (BITS == 8) return chunk[lane * 4 + j];
  const uint8_t byte = chunk[lane * 4 + (j & 3)];
  return j < 4 ? (byte & 0xF) : (byte >> 4);
}

template <int MR, int BITS>
inline void exact_tile(const uint8_t* w, const TileArgs& t, Vec (&out)[MR][1]) {
  const Acts& a = *t.a;
  constexpr int per_chunk = BITS == 4 ? 8 : 4;
  constexpr int32_t off = BITS == 4 ? 8 : 128;
  for (int m = 0; m < MR; ++m) {
    const float* x = a.xf + (t.m0 + m) * a.kp;
    for (int l = 0; l < kTileN; ++l) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        float bacc = 0.f;
        for (int c = 0; c < kBlockK / per_chunk; ++c) {
          const uint8_t* chunk = w + (b * (kBlockK / per_chunk) + c) * kChunk;
          for (int j = 0; j < per_chunk; ++j)
            bacc += static_cast<float>(weight_u<BITS>(chunk, l, j) - off) * x[b * kBlockK + c * per_chunk + j];
        }
        acc += t.gscale ? bacc * t.gscale[(b / t.blocks_per_group) * kTileN + l] : bacc;
      }
      out[m][0].v[l] = acc;
    }
  }
}

template <int MR, int BITS>
inline void fast_tile(const uint8_t* w, const TileArgs& t, Vec (&out)[MR][1]) {
  const Acts& a = *t.a;
  constexpr int per_chunk = BITS == 4 ? 8 : 4;
  for (int m = 0; m < MR; ++m) {
    const int8_t* x = a.xq.data() + (t.m0 + m) * a.kp;
    for (int l = 0; l < kTileN; ++l) {
      float acc = 0.f;
      for (int64_t b = 0; b < a.nb; ++b) {
        int32_t s = a.xc[(t.m0 + m) * a.nb + b];
        for (int c = 0; c < kBlockK / per_chunk; ++c) {
          const uint8_t* chunk = w + (b * (kBlockK / per_chunk) + c) * kChunk;
          for (int j = 0; j < per_chunk; ++j) s += weight_u<BITS>(chunk, l, j) * x[b * kBlockK + c * per_chunk + j];
        }
        float d = a.xd[(t.m0 + m) * a.nb + b];
        if (t.gscale) d *= t.gscale[(b / t.blocks_per_group) * kTileN + l];
        acc += static_cast<float>(s) * d;
      }
      out[m][0].v[l] = acc;
    }
  }
}

inline void vec_store(float* dst, const float* scale, const float* bias, const Vec& v, int valid) {
  for (int l = 0; l < valid; ++l) dst[l] = v.v[l] * (scale ? scale[l] : 1.f) + (bias ? bias[l] : 0.f);
}

#endif  // generic

// ------------------------------------------------------------------------------------------------ driver

template <typename T>
void store_rows(const float* tile, int64_t rows, int64_t n0, int valid, T* y, int64_t ldy) {
  for (int64_t m = 0; m < rows; ++m)
    for (int l = 0; l < valid; ++l) y[m * ldy + n0 + l] = static_cast<T>(tile[m * kTileN + l]);
}

template <int MR, int BITS, bool FAST>
void run_rows(const uint8_t* w, const TileArgs& t, const float* scale, const float* bias, int valid, float* tile) {
  Vec out[MR][kVecs];
  if constexpr (FAST)
    fast_tile<MR, BITS>(w, t, out);
  else
    exact_tile<MR, BITS>(w, t, out);
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < kVecs; ++h) {
      const int off = h * kLanes;
      vec_store(tile + m * kTileN + off, scale ? scale + off : nullptr, bias ? bias + off : nullptr, out[m][h],
                std::max(0, std::min(kLanes, valid - off)));
    }
}

template <int BITS, bool FAST>
void run_rows_any(int mr, const uint8_t* w, const TileArgs& t, const float* scale, const float* bias, int valid,
                  float* tile) {
  switch (mr) {
    case 1: return run_rows<1, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 2: return run_rows<2, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 3: return run_rows<3, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 4: return run_rows<4, BITS, FAST>(w, t, scale, bias, valid, tile);
#if defined(GLM_AVX512)  // 8 rows need 16 accumulators plus temporaries: fine in 32 zmm, not in 16 ymm
    case 5: return run_rows<5, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 6: return run_rows<6, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 7: return run_rows<7, BITS, FAST>(w, t, scale, bias, valid, tile);
    case 8: return run_rows<8, BITS, FAST>(w, t, scale, bias, valid, tile);
#endif
    default: TORCH_CHECK(false, "unsupported row count ", mr);
  }
}

#if defined(GLM_AVX512)
constexpr int kRowsPerPass = kMaxRows;
#else
constexpr int kRowsPerPass = 4;
#endif

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

at::Tensor wq_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale,
                     const std::optional<at::Tensor>& bias, int64_t bits, int64_t group_size, int64_t n, bool fast) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous CPU [M, K] tensor");
  const int64_t m = x.size(0), k = x.size(1), kp = round_up(k, kBlockK), np = round_up(n, kTileN);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == np * kp * bits / 8,
              "w must be the contiguous uint8 tile16 layout of a [", n, ", ", k, "] int", bits, " weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be contiguous float32");
  const int64_t groups = group_size ? kp / group_size : 0;
  TORCH_CHECK(group_size == 0 || (group_size % kBlockK == 0 && kp % group_size == 0),
              "group_size must be 0 (per channel) or a multiple of 32 dividing K");
  TORCH_CHECK(scale.numel() == (group_size ? np * groups : np), "scale has the wrong size for this layout");
  const float* bias_p = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == np,
                "bias must be contiguous float32 of N padded to 16");
    bias_p = bias->data_ptr<float>();
  }
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0 || n == 0) return y;

  Acts a;
  a.m = m;
  a.kp = kp;
  a.nb = kp / kBlockK;
  float_rows(x, kp, a);
  if (fast) quantize_rows(a, bits == 4 ? fast_offset<4>() : fast_offset<8>());

  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const int64_t tile_bytes = kTileN * kp * bits / 8;
  const auto type = x.scalar_type();
  auto one_tile = [&](int64_t ti, float* tile) {
    const int64_t n0 = ti * kTileN;
    const int valid = static_cast<int>(std::min<int64_t>(kTileN, n - n0));
    const uint8_t* wt = wp + ti * tile_bytes;
    TileArgs t{&a, 0, group_size ? sp + ti * groups * kTileN : nullptr, group_size / kBlockK};
    const float* chan_scale = group_size ? nullptr : sp + n0;
    const float* tile_bias = bias_p ? bias_p + n0 : nullptr;
    for (int64_t m0 = 0; m0 < m; m0 += kRowsPerPass) {  // more rows than one pass: the tile is in cache by then
      const int mr = static_cast<int>(std::min<int64_t>(kRowsPerPass, m - m0));
      t.m0 = m0;
      if (bits == 4)
        fast ? run_rows_any<4, true>(mr, wt, t, chan_scale, tile_bias, valid, tile)
             : run_rows_any<4, false>(mr, wt, t, chan_scale, tile_bias, valid, tile);
      else
        fast ? run_rows_any<8, true>(mr, wt, t, chan_scale, tile_bias, valid, tile)
             : run_rows_any<8, false>(mr, wt, t, chan_scale, tile_bias, valid, tile);
      switch (type) {
        case at::kFloat: store_rows(tile, mr, n0, valid, y.data_ptr<float>() + m0 * n, n); break;
        case at::kBFloat16: store_rows(tile, mr, n0, valid, y.data_ptr<c10::BFloat16>() + m0 * n, n); break;
        default: store_rows(tile, mr, n0, valid, y.data_ptr<c10::Half>() + m0 * n, n); break;
      }
    }
  };
  // Threads claim runs of tiles from a shared counter rather than a fixed share each: on a machine shared with
  // other work, a thread that loses its core for a while then delays the call by one run, not by half the matrix.
  const int64_t ntiles = np / kTileN;
  const int64_t run = std::clamp<int64_t>(ntiles / (4 * at::get_num_threads()), 1, kTilesPerRun);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> tile(kRowsPerPass * kTileN);
    for (int64_t t0 = next.fetch_add(run); t0 < ntiles; t0 = next.fetch_add(run))
      for (int64_t ti = t0; ti < std::min(t0 + run, ntiles); ++ti) one_tile(ti, tile.data());
  });
  return y;
}

// Rows `rows` of the dequantized weight q * scale, [len(rows), K], in `dtype`: the embedding lookup of a tied,
// quantized lm_head, and the exact path's weight tiles for large M.
template <typename T>
void unpack_rows_impl(const uint8_t* w, const float* s, const int64_t* rows, int64_t r, int64_t bits,
                      int64_t group_size, int64_t k, int64_t kp, int64_t groups, T* out) {
  const int64_t tile_bytes = kTileN * kp * bits / 8;
  const int per_chunk = bits == 4 ? 8 : 4;
  const int32_t off = bits == 4 ? 8 : 128;
  at::parallel_for(0, r, 16, [&](int64_t i0, int64_t i1) {
    std::vector<float> row(kp);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = rows[i], ti = n / kTileN, lane = n % kTileN;
      const uint8_t* wt = w + ti * tile_bytes + lane * 4;
      for (int64_t c = 0; c < kp / per_chunk; ++c) {
        const uint8_t* p = wt + c * kChunk;
        float* dst = row.data() + c * per_chunk;
        if (bits == 4) {
          for (int j = 0; j < 4; ++j) {
            dst[j] = static_cast<float>((p[j] & 0xF) - off);
            dst[4 + j] = static_cast<float>((p[j] >> 4) - off);
          }
        } else {
          for (int j = 0; j < 4; ++j) dst[j] = static_cast<float>(p[j] - off);
        }
      }
      T* o = out + i * k;
      if (group_size) {
        const float* gs = s + ti * groups * kTileN + lane;
        for (int64_t j = 0; j < k; ++j) o[j] = static_cast<T>(row[j] * gs[(j / group_size) * kTileN]);
      } else {
        const float sc = s[n];
        for (int64_t j = 0; j < k; ++j) o[j] = static_cast<T>(row[j] * sc);
      }
    }
  });
}

at::Tensor unpack_rows(const at::Tensor& w, const at::Tensor& scale, const at::Tensor& rows, int64_t bits,
                       int64_t group_size, int64_t n, int64_t k, at::ScalarType dtype) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t kp = round_up(k, kBlockK), np = round_up(n, kTileN);
  const int64_t groups = group_size ? kp / group_size : 0;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == np * kp * bits / 8,
              "w must be the contiguous uint8 tile16 layout");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == (group_size ? np * groups : np), "scale has the wrong size for this layout");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(), "rows must be int64 [R]");
  const int64_t r = rows.size(0);
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < r; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < n, "row index ", rp[i], " out of range [0, ", n, ")");
  at::Tensor out = at::empty({r, k}, at::TensorOptions().dtype(dtype));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  switch (dtype) {
    case at::kFloat: unpack_rows_impl(wp, sp, rp, r, bits, group_size, k, kp, groups, out.data_ptr<float>()); break;
    case at::kBFloat16:
      unpack_rows_impl(wp, sp, rp, r, bits, group_size, k, kp, groups, out.data_ptr<c10::BFloat16>());
      break;
    case at::kHalf: unpack_rows_impl(wp, sp, rp, r, bits, group_size, k, kp, groups, out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "dtype must be float32, bfloat16 or float16");
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ dequantize

// One tile's q * scale, transposed: out[kk * ldo + l] for K value kk and channel l of the tile (the first `valid`).
// Many-row inputs multiply this [K, channels] slice by x with one GEMM.
#if defined(GLM_AVX512)
template <typename T>
inline void store16(T* dst, __m512 v, __mmask16 mask) {
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(dst, mask, v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {  // bfloat16, rounded to nearest even like c10::BFloat16 (no NaN can occur here)
    __m512i b = _mm512_castps_si512(v);
    b = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                             _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
    _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
  }
}

template <int BITS, typename T>
void dequant_tile_t(const uint8_t* wt, const float* cs, const float* gs, int64_t blocks_per_group, int64_t k,
                    T* out, int64_t ldo, int valid) {
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i top[4];
  for (int j = 0; j < 4; ++j)
    top[j] = _mm512_broadcast_i32x4(_mm_setr_epi32(j << 24 | 0x808080, (4 + j) << 24 | 0x808080,
                                                   (8 + j) << 24 | 0x808080, (12 + j) << 24 | 0x808080));
  __m512 s = cs ? _mm512_loadu_ps(cs) : _mm512_setzero_ps();
  for (int64_t b = 0; b * kBlockK < k; ++b) {
    if (gs) s = _mm512_loadu_ps(gs + (b / blocks_per_group) * kTileN);
    if constexpr (BITS == 4) {
      for (int c = 0; c < 4; ++c) {
        const __m512i v = _mm512_loadu_si512(wt + (b * 4 + c) * kChunk);
        for (int h = 0; h < 8; ++h) {
          const int64_t kk = b * kBlockK + c * 8 + h / 2 + 4 * (h % 2);
          if (kk < k) store16(out + kk * ldo, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * h), lut), s),
                              mask);
        }
      }
    } else {
      const __m512 s24 = _mm512_mul_ps(s, _mm512_set1_ps(0x1p-24f));
      for (int c = 0; c < 8; ++c) {
        const __m512i v = _mm512_xor_si512(_mm512_loadu_si512(wt + (b * 8 + c) * kChunk), flip);
        for (int j = 0; j < 4; ++j) {
          const int64_t kk = b * kBlockK + c * 4 + j;
          if (kk < k) store16(out + kk * ldo, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, top[j])), s24),
                              mask);
        }
      }
    }
  }
}
#else
template <int BITS, typename T>
void dequant_tile_t(const uint8_t* wt, const float* cs, const float* gs, int64_t blocks_per_group, int64_t k,
                    T* out, int64_t ldo, int valid) {
  constexpr int per_chunk = BITS == 4 ? 8 : 4;
  constexpr int32_t off = BITS == 4 ? 8 : 128;
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t b = kk / kBlockK;
    const uint8_t* chunk = wt + (kk / per_chunk) * kChunk;
    const int j = static_cast<int>(kk % per_chunk);
    for (int l = 0; l < valid; ++l) {
      const uint8_t byte = chunk[l * 4 + (j & 3)];
      const int32_t u = BITS == 8 ? byte : (j < 4 ? (byte & 0xF) : (byte >> 4));
      const float sc = gs ? gs[(b / blocks_per_group) * kTileN + l] : cs[l];
      out[kk * ldo + l] = static_cast<T>(static_cast<float>(u - off) * sc);
    }
  }
}
#endif

void unpack_t(const at::Tensor& w, const at::Tensor& scale, int64_t bits, int64_t group_size, int64_t n, int64_t k,
              int64_t r0, at::Tensor& out) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t kp = round_up(k, kBlockK), np = round_up(n, kTileN);
  const int64_t groups = group_size ? kp / group_size : 0;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.numel() == np * kp * bits / 8,
              "w must be the contiguous uint8 tile16 layout");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == (group_size ? np * groups : np), "scale has the wrong size for this layout");
  TORCH_CHECK(out.dim() == 2 && out.size(0) == k && out.is_contiguous(), "out must be a contiguous [K, rows] tensor");
  const int64_t r1 = r0 + out.size(1);
  TORCH_CHECK(0 <= r0 && r0 % kTileN == 0 && r1 <= n, "rows [r0, r1) must start on a tile of 16 and end by N");
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const int64_t tile_bytes = kTileN * kp * bits / 8, ldo = r1 - r0;
  auto run = [&](auto* o) {
    at::parallel_for(r0 / kTileN, (r1 + kTileN - 1) / kTileN, 4, [&](int64_t t0, int64_t t1) {
      for (int64_t ti = t0; ti < t1; ++ti) {
        const int valid = static_cast<int>(std::min<int64_t>(kTileN, r1 - ti * kTileN));
        const float* cs = group_size ? nullptr : sp + ti * kTileN;
        const float* gs = group_size ? sp + ti * groups * kTileN : nullptr;
        auto* dst = o + (ti * kTileN - r0);
        if (bits == 4)
          dequant_tile_t<4>(wp + ti * tile_bytes, cs, gs, group_size / kBlockK, k, dst, ldo, valid);
        else
          dequant_tile_t<8>(wp + ti * tile_bytes, cs, gs, group_size / kBlockK, k, dst, ldo, valid);
      }
    });
  };
  switch (out.scalar_type()) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "out must be float32, bfloat16 or float16");
  }
}

// ------------------------------------------------------------------------------------------------ layout

// The official stored weight (int8 [N, K * bits / 8]; INT4: q[2i] in the high nibble of byte i, q[2i+1] in the
// low one) into the tile16 layout and back: the same mapping as pack_tiles / unpack_tiles in cpu_wq.py, in one pass.
template <bool TO_TILES>
void convert_layout(uint8_t* tiles, int8_t* official, int64_t bits, int64_t n, int64_t k) {
  const int64_t kp = round_up(k, kBlockK), np = round_up(n, kTileN), kb = k * bits / 8;
  const int per_chunk = bits == 4 ? 8 : 4;
  const int64_t chunks = kp / per_chunk;
  at::parallel_for(0, np / kTileN, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti)
      for (int64_t c = 0; c < chunks; ++c)
        for (int l = 0; l < kTileN; ++l) {
          const int64_t r = ti * kTileN + l;
          uint8_t* dst = tiles + (ti * chunks + c) * kChunk + l * 4;
          for (int j = 0; j < 4; ++j) {
            if (bits == 8) {
              const int64_t kk = c * 4 + j;
              const bool in = r < n && kk < k;
              if (TO_TILES)
                dst[j] = in ? static_cast<uint8_t>(official[r * kb + kk]) ^ 0x80 : 0x80;
              else if (in)
                official[r * kb + kk] = static_cast<int8_t>(dst[j] ^ 0x80);
              continue;
            }
            uint8_t u[2];  // the values at k = c*8 + j (low nibble) and c*8 + 4 + j (high nibble), as q + 8
            for (int h = 0; h < 2; ++h) {
              const int64_t kk = c * 8 + j + 4 * h;
              const bool in = r < n && kk < k;
              const uint8_t byte = in ? static_cast<uint8_t>(official[r * kb + kk / 2]) : 0;
              if (TO_TILES) {
                u[h] = in ? (((kk % 2 ? byte : byte >> 4) & 0xF) ^ 8) : 8;  // 4-bit two's complement q -> q + 8
              } else if (in) {
                const uint8_t q4 = ((h ? dst[j] >> 4 : dst[j]) & 0xF) ^ 8;
                uint8_t& o = reinterpret_cast<uint8_t&>(official[r * kb + kk / 2]);
                o = kk % 2 ? ((o & 0xF0) | q4) : ((o & 0x0F) | (q4 << 4));
              }
            }
            if (TO_TILES) dst[j] = static_cast<uint8_t>(u[0] | (u[1] << 4));
          }
        }
  });
}

at::Tensor to_tiles(const at::Tensor& official, int64_t bits, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(official.scalar_type() == at::kChar && official.dim() == 2 && official.is_contiguous() &&
              official.size(1) == k * bits / 8, "official must be the contiguous int8 [N, K * bits / 8] weight");
  const int64_t n = official.size(0);
  at::Tensor tiles = at::empty({round_up(n, kTileN) * round_up(k, kBlockK) * bits / 8}, at::kByte);
  convert_layout<true>(tiles.data_ptr<uint8_t>(), official.data_ptr<int8_t>(), bits, n, k);
  return tiles;
}

at::Tensor from_tiles(const at::Tensor& tiles, int64_t bits, int64_t n, int64_t k) {
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  TORCH_CHECK(tiles.scalar_type() == at::kByte && tiles.is_contiguous() &&
              tiles.numel() == round_up(n, kTileN) * round_up(k, kBlockK) * bits / 8, "tiles has the wrong size");
  at::Tensor official = at::empty({n, k * bits / 8}, at::kChar);
  convert_layout<false>(tiles.data_ptr<uint8_t>(), official.data_ptr<int8_t>(), bits, n, k);
  return official;
}

std::string isa() { return isa_name(); }

}  // namespace

TORCH_LIBRARY(GLM_CPU_NS, m) {
  m.def("wq_linear(Tensor x, Tensor w, Tensor scale, Tensor? bias, int bits, int group_size, int n, bool fast) -> Tensor");
  m.def("unpack_rows(Tensor w, Tensor scale, Tensor rows, int bits, int group_size, int n, int k, ScalarType dtype) -> Tensor");
  m.def("unpack_t(Tensor w, Tensor scale, int bits, int group_size, int n, int k, int r0, Tensor(a!) out) -> ()");
  m.def("to_tiles(Tensor official, int bits, int k) -> Tensor");
  m.def("from_tiles(Tensor tiles, int bits, int n, int k) -> Tensor");
  m.def("isa() -> str", isa);
}

TORCH_LIBRARY_IMPL(GLM_CPU_NS, CPU, m) {
  m.impl("wq_linear", wq_linear);
  m.impl("unpack_rows", unpack_rows);
  m.impl("unpack_t", unpack_t);
  m.impl("to_tiles", to_tiles);
  m.impl("from_tiles", from_tiles);
}
