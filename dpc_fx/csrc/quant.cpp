// The quantisers' hot loops for float32 on the CPU: one pass over a tensor each, no
// temporaries, called through ctypes (a few microseconds a call, where a compiled torch
// kernel costs about thirty). dpc_fx/native.py builds this file on first use and falls
// back to the torch kernels (dpc_fx/kernels.py) where it cannot.
//
// The arithmetic is the torch kernels' own, op for op and in the same order, in IEEE
// float32 (built without -ffast-math and with -ffp-contract=off: no fused multiply-adds),
// so every value is the same bit for bit; tests/test_native.py checks it.
//
// Codes are packed by planes as dpc_fx.fused.pack does: the n codes are cut into `parts`
// contiguous parts of m = n / parts codes; codes at the same place in each part share
// bytes, and a remainder that fills no group follows, a byte a code.

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

constexpr float kInf = std::numeric_limits<float>::infinity();
// Below this many elements a loop runs on the calling thread: waking the pool costs more.
constexpr int64_t kGrain = 1 << 15;

inline int threads_for(int64_t n, int nthreads) {
  int64_t most = n / kGrain;
  return most < 1 ? 1 : (most < nthreads ? static_cast<int>(most) : nthreads);
}

inline v8f splat(float v) { return v8f{v, v, v, v, v, v, v, v}; }

inline bool finite(float v) { return std::fabs(v) < kInf; }

// The finite values' min and max of x[0, n) folded into lo/hi; `bad` set if any value is
// not finite. Two accumulators of eight lanes; `v < lo ? v : lo` skips a nan by itself, and
// an infinity found on the way sends the block to the masked loop, which skips it too.
void range_block(const float* x, int64_t n, float& lo, float& hi, bool& bad) {
  const v8f inf = splat(kInf);
  v8f lo0 = splat(kInf), hi0 = splat(-kInf), lo1 = lo0, hi1 = hi0;
  v8i odd = {0, 0, 0, 0, 0, 0, 0, 0};  // lanes that saw a nan or an infinity
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v8f a, b;
    std::memcpy(&a, x + i, sizeof a);
    std::memcpy(&b, x + i + 8, sizeof b);
    lo0 = a < lo0 ? a : lo0;
    hi0 = a > hi0 ? a : hi0;
    lo1 = b < lo1 ? b : lo1;
    hi1 = b > hi1 ? b : hi1;
    // |v| < inf is false for inf and nan alike: the lanes' sign bits drop out by `abs`.
    odd |= ~((a < inf) & (a > -inf)) | ~((b < inf) & (b > -inf));
  }
  bool clean = true;
  for (int k = 0; k < 8; ++k) clean = clean && odd[k] == 0;
  if (!clean) {  // rare: measure the finite values again, masking the rest
    bad = true;
    lo0 = splat(kInf), hi0 = splat(-kInf), lo1 = lo0, hi1 = hi0;
    for (int64_t j = 0; j < i; ++j) {
      float v = x[j];
      if (finite(v)) {
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
    }
  }
  for (int k = 0; k < 8; ++k) {
    float l = lo0[k] < lo1[k] ? lo0[k] : lo1[k], h = hi0[k] > hi1[k] ? hi0[k] : hi1[k];
    lo = l < lo ? l : lo;
    hi = h > hi ? h : hi;
  }
  for (; i < n; ++i) {
    float v = x[i];
    if (finite(v)) {
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    } else {
      bad = true;
    }
  }
}

// torch: span = hi - lo; where(span > 0, span / levels, 1)
inline float scale_of(float lo, float hi, float levels) {
  float span = hi - lo;
  return span > 0.0f ? span / levels : 1.0f;
}

// The nearest-rounding code of v over [lo, lo + top * scale], as kernels._uint8_codes
// computes it: round((v - lo) / scale) clamped into [0, top]; 0 for a non-finite v.
// (Branch-free, so that gcc vectorises the loops that call it.)
inline float code_of(float v, float lo, float scale, float top) {
  float q = std::nearbyint((v - lo) / scale);
  q = q > 0.0f ? q : 0.0f;
  q = q > top ? top : q;
  return finite(v) ? q : 0.0f;
}

// The float code q stands for; a non-finite v passes through.
inline float value_of(float v, float q, float lo, float scale) {
  return finite(v) ? q * scale + lo : v;
}

inline uint8_t byte(float q) { return static_cast<uint8_t>(static_cast<int32_t>(q)); }

inline int parts_of(int bits) { return bits <= 4 ? 2 : (bits <= 6 ? 4 : 1); }

// Bytes the planes of m codes a part take: one a code at 1 or 2 parts, three at 4.
inline int64_t plane_bytes(int64_t m, int parts) { return parts == 4 ? 3 * m : m; }

// Bytes n codes of `bits` bits take packed (kernels.packed_bytes): the planes, then the
// remainder a byte a code.
inline int64_t packed_bytes(int64_t n, int bits) {
  const int parts = parts_of(bits);
  return plane_bytes(n / parts, parts) + n % parts;
}

// f(begin, end) over [0, n), split evenly over t threads (on this one if t is 1).
template <class F>
void split(int64_t n, int t, F f) {
  if (t <= 1) {
    f(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(t)
  {
    int64_t k = omp_get_thread_num(), parts = omp_get_num_threads();
    f(n * k / parts, n * (k + 1) / parts);
  }
}

// Codes and floats of x[begin, end) over one range: codes one a byte into q.
void codes_span(const float* __restrict__ x, float* __restrict__ xhat, uint8_t* __restrict__ q,
                float lo, float scale, float top, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    float c = code_of(x[i], lo, scale, top);
    xhat[i] = value_of(x[i], c, lo, scale);
    q[i - begin] = byte(c);
  }
}

#if defined(__AVX2__)
// Thirty-two codes at a time, by hand: left to itself gcc narrows the codes to bytes one lane
// at a time, which took longer than the arithmetic (the 8-bit loop 1.7x, the 6-bit one 3x
// the time of the same loop writing floats alone).

// code_of and value_of on eight lanes, in the same operations: maxps(q, 0) is `q > 0 ? q :
// 0` and minps(top, q) is `q > top ? top : q`, lane by lane, a nan included.
struct Grid8 {
  __m256 lo, scale, top, inf, zero;
  Grid8(float lo_, float scale_, float top_)
      : lo(_mm256_set1_ps(lo_)), scale(_mm256_set1_ps(scale_)), top(_mm256_set1_ps(top_)),
        inf(_mm256_set1_ps(kInf)), zero(_mm256_setzero_ps()) {}

  // |v| < inf, as a lane mask.
  __m256 finite(__m256 v) const {
    const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
    return _mm256_cmp_ps(abs, inf, _CMP_LT_OQ);
  }
  // The codes of v, as floats, short of code_of's last step (the 0 for a non-finite v).
  __m256 level(__m256 v) const {
    __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_sub_ps(v, lo), scale),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(top, _mm256_max_ps(q, zero));
  }
  // code_of's codes as int32, and value_of's floats written to xhat.
  __m256i codes(const float* x, float* xhat) const {
    const __m256 v = _mm256_loadu_ps(x), ok = finite(v);
    const __m256 q = _mm256_and_ps(level(v), ok);
    const __m256 value = _mm256_add_ps(_mm256_mul_ps(q, scale), lo);
    _mm256_storeu_ps(xhat, _mm256_blendv_ps(v, value, ok));
    return _mm256_cvttps_epi32(q);
  }
};

// Four vectors of eight int32 in [0, 255] as 32 bytes, in order (packus works within each
// 128-bit half; the permute puts the halves' quarters back in place).
inline __m256i bytes32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i words = _mm256_packus_epi16(_mm256_packus_epi32(a, b), _mm256_packus_epi32(c, d));
  return _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The same for int32 in [-128, 127], as int8.
inline __m256i signed_bytes32(__m256i a, __m256i b, __m256i c, __m256i d) {
  const __m256i words = _mm256_packs_epi16(_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d));
  return _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// The 32 codes of x[i, i + 32) as bytes, their floats written to xhat.
inline __m256i codes32(const Grid8& grid, const float* x, float* xhat) {
  return bytes32(grid.codes(x, xhat), grid.codes(x + 8, xhat + 8), grid.codes(x + 16, xhat + 16),
                 grid.codes(x + 24, xhat + 24));
}

// Bytes shifted left by k, only the high bits that `mask` keeps (AVX2 shifts no single bytes:
// a 16-bit shift carries the low byte's top bits into the high byte's low ones, which the
// mask drops).
template <int k>
inline __m256i top_bits(__m256i q, int mask) {
  return _mm256_and_si256(_mm256_slli_epi16(q, k), _mm256_set1_epi8(static_cast<char>(mask)));
}

// quantize_planes' planes, 32 plane positions a step from begin; returns where it stopped.
int64_t quantize_planes32(const float* x, float* xhat, uint8_t* __restrict__ packed, int64_t m,
                          int parts, const Grid8& grid, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 32 <= end; i += 32) {
    __m256i q[4];
    for (int p = 0; p < parts; ++p) q[p] = codes32(grid, x + p * m + i, xhat + p * m + i);
    __m256i* out = reinterpret_cast<__m256i*>(packed + i);
    if (parts == 1) {
      _mm256_storeu_si256(out, q[0]);
    } else if (parts == 2) {
      _mm256_storeu_si256(out, _mm256_or_si256(q[0], top_bits<4>(q[1], 0xF0)));
    } else {  // as the scalar loop: the fourth code's 2-bit pieces on top of the other three
      _mm256_storeu_si256(out, _mm256_or_si256(q[0], top_bits<6>(q[3], 0xC0)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + m + i),
                          _mm256_or_si256(q[1], top_bits<4>(q[3], 0xC0)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(packed + 2 * m + i),
                          _mm256_or_si256(q[2], top_bits<2>(q[3], 0xC0)));
    }
  }
  return i;
}
#endif

// The loops, over [begin, end) of the plane index i: 32 at a time in vector registers
// where the CPU has AVX2, the rest (or all, without it) a block at a time through
// codes_span (one stream in, one out: the loop gcc vectorises best) into a buffer on the
// stack, the planes then combined bytewise.
void quantize_planes(const float* x, float* xhat, uint8_t* __restrict__ packed, int64_t m,
                     int parts, float lo, float scale, float top, int64_t begin, int64_t end) {
#if defined(__AVX2__)
  begin = quantize_planes32(x, xhat, packed, m, parts, Grid8(lo, scale, top), begin, end);
#endif
  if (parts == 1) {
    codes_span(x, xhat, packed + begin, lo, scale, top, begin, end);
    return;
  }
  constexpr int64_t kBlock = 1024;
  alignas(64) uint8_t q[4][kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t e = b + kBlock < end ? b + kBlock : end, len = e - b;
    for (int p = 0; p < parts; ++p)
      codes_span(x + p * m, xhat + p * m, q[p], lo, scale, top, b, e);
    uint8_t* __restrict__ p0 = packed + b;
    if (parts == 2) {
      for (int64_t i = 0; i < len; ++i) p0[i] = static_cast<uint8_t>(q[0][i] | (q[1][i] << 4));
    } else {  // three codes in the low 6 bits of three bytes, the fourth's 2-bit pieces on top
      uint8_t* __restrict__ p1 = p0 + m;
      uint8_t* __restrict__ p2 = p0 + 2 * m;
      for (int64_t i = 0; i < len; ++i) {
        const uint8_t c3 = q[3][i];
        p0[i] = static_cast<uint8_t>(q[0][i] | (c3 << 6));
        p1[i] = static_cast<uint8_t>(q[1][i] | ((c3 << 4) & 0xC0));
        p2[i] = static_cast<uint8_t>(q[2][i] | ((c3 << 2) & 0xC0));
      }
    }
  }
}

void dequantize_planes(const uint8_t* __restrict__ packed, float* __restrict__ out, int64_t m,
                       int parts, float lo, float scale, int64_t begin, int64_t end) {
  if (parts == 1) {
    for (int64_t i = begin; i < end; ++i) out[i] = static_cast<float>(packed[i]) * scale + lo;
  } else if (parts == 2) {
    float* __restrict__ o1 = out + m;
    for (int64_t i = begin; i < end; ++i) {
      uint8_t b = packed[i];
      out[i] = static_cast<float>(b & 15) * scale + lo;
      o1[i] = static_cast<float>(b >> 4) * scale + lo;
    }
  } else {
    const uint8_t* __restrict__ p1 = packed + m;
    const uint8_t* __restrict__ p2 = packed + 2 * m;
    float* __restrict__ o1 = out + m;
    float* __restrict__ o2 = out + 2 * m;
    float* __restrict__ o3 = out + 3 * m;
    for (int64_t i = begin; i < end; ++i) {
      uint8_t b0 = packed[i], b1 = p1[i], b2 = p2[i];
      uint8_t q3 = static_cast<uint8_t>((b0 >> 6) | ((b1 >> 4) & 0x0C) | ((b2 >> 2) & 0x30));
      out[i] = static_cast<float>(b0 & 63) * scale + lo;
      o1[i] = static_cast<float>(b1 & 63) * scale + lo;
      o2[i] = static_cast<float>(b2 & 63) * scale + lo;
      o3[i] = static_cast<float>(q3) * scale + lo;
    }
  }
}

void fake_quant_span(const float* __restrict__ x, float* __restrict__ xhat, float lo,
                     float scale, float top, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    xhat[i] = value_of(x[i], code_of(x[i], lo, scale, top), lo, scale);
}

// kernels._uniform's noise: a murmur3-style mix of the element's index and the seed, its
// top 24 bits as a float in [0, 1). Written once for a lane type: uint32_t, or eight lanes.
template <class U>
inline U mix(U index, uint32_t seed) {
  U h = (index ^ seed) * 0x9E3779B1u;
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h >> 8;
}

// floor, lane by lane.
inline v8f floor_of(v8f q) {
  for (int k = 0; k < 8; ++k) q[k] = std::floor(q[k]);
  return q;
}

#if defined(__AVX512F__)
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

inline v16f floor_of(v16f q) {
  __m512 r;
  std::memcpy(&r, &q, sizeof r);
  r = _mm512_roundscale_ps(r, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  std::memcpy(&q, &r, sizeof q);
  return q;
}
#endif

// The stochastic levels of the lanes v, elements `index`: floor((v - lo) / scale + u), u the
// noise of their index, kept at or below top. For a lane type F of float (I: int32, U:
// uint32, the same width).
template <class F, class I, class U>
inline F stochastic_lanes(F v, U index, uint32_t seed, F lo, F scale, F top) {
  const F u = __builtin_convertvector(reinterpret_cast<I>(mix(index, seed)), F) *
              (1.0f / 16777216.0f);
  const F q = floor_of((v - lo) / scale + u);
  const F one = F{} + 1.0f;
  return q - reinterpret_cast<F>(reinterpret_cast<I>(q > top) & reinterpret_cast<I>(one));
}

// Stochastic rounding of x[begin, end) onto the levels of [lo, lo + top * scale]: each
// element's level floor((v - lo) / scale + u), kept at or below top, handed to
// `eight(i, q)` eight elements at a time and to `one(i, q)` for the last few. Eight lanes by
// hand: left to itself gcc carries the 64-bit index in vectors and narrows it for the
// noise's hash every step (0.58 against 0.42 ns an element on one core).
// (x is not restrict-qualified: stochastic_span writes the levels over x where the caller
// rounds in place, each element after its own read.)
template <class Eight, class One>
inline void stochastic_levels(const float* x, float lo, float scale, float top,
                              uint32_t seed, int64_t begin, int64_t end, Eight eight, One one) {
  const v8f lo8 = splat(lo), scale8 = splat(scale), top8 = splat(top);
  v8u index;
  for (int k = 0; k < 8; ++k) index[k] = static_cast<uint32_t>(begin + k);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8, index += 8u) {
    v8f v;
    std::memcpy(&v, x + i, sizeof v);
    eight(i, stochastic_lanes<v8f, v8i>(v, index, seed, lo8, scale8, top8));
  }
  for (; i < end; ++i) {
    float u = static_cast<float>(static_cast<int32_t>(mix(static_cast<uint32_t>(i), seed))) *
              (1.0f / 16777216.0f);
    float q = std::floor((x[i] - lo) / scale + u);
    one(i, q - (q > top ? 1.0f : 0.0f));
  }
}

// out may be x (in place): element i is written only after it is read. Sixteen lanes at a
// time where the CPU has AVX-512: the noise's three 32-bit multiplies are most of the loop's
// work, and a 512-bit multiply does twice the lanes of a 256-bit one in about the same time
// (the same values).
void stochastic_span(const float* x, float* out, float lo, float scale, float top,
                     uint32_t seed, int64_t begin, int64_t end) {
#if defined(__AVX512F__)
  {
    const v16f lo16 = lo + v16f{}, scale16 = scale + v16f{}, top16 = top + v16f{};
    v16u index;
    for (int k = 0; k < 16; ++k) index[k] = static_cast<uint32_t>(begin + k);
    for (; begin + 16 <= end; begin += 16, index += 16u) {
      v16f v;
      std::memcpy(&v, x + begin, sizeof v);
      v = stochastic_lanes<v16f, v16i>(v, index, seed, lo16, scale16, top16) * scale16 + lo16;
      std::memcpy(out + begin, &v, sizeof v);
    }
  }
#endif
  const v8f lo8 = splat(lo), scale8 = splat(scale);
  stochastic_levels(
      x, lo, scale, top, seed, begin, end,
      [=](int64_t i, v8f q) {
        v8f v = q * scale8 + lo8;
        std::memcpy(out + i, &v, sizeof v);
      },
      [=](int64_t i, float q) { out[i] = q * scale + lo; });
}

// int8 codes of x[begin, end) for the integer kernels (dpc_fx/int8.py): nearest rounding
// over [lo, lo + top * scale] as code_of, shifted down by `offset`. Returns whether a value
// was not finite (its code is then meaningless: the caller takes the torch kernel).
bool int8_codes_span(const float* __restrict__ x, int8_t* __restrict__ codes, float lo,
                     float scale, float top, float offset, int64_t begin, int64_t end) {
  int odd = 0;
  int64_t i = begin;
#if defined(__AVX2__)
  const Grid8 grid(lo, scale, top);
  const __m256 offset8 = _mm256_set1_ps(offset);
  __m256 fine = _mm256_castsi256_ps(_mm256_set1_epi32(-1));  // lanes all finite so far
  for (; i + 32 <= end; i += 32) {
    __m256i c[4];
    for (int k = 0; k < 4; ++k) {
      const __m256 v = _mm256_loadu_ps(x + i + 8 * k);
      fine = _mm256_and_ps(fine, grid.finite(v));
      c[k] = _mm256_cvttps_epi32(_mm256_sub_ps(grid.level(v), offset8));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(codes + i),
                        signed_bytes32(c[0], c[1], c[2], c[3]));
  }
  odd |= _mm256_movemask_ps(fine) != 0xFF;
#endif
  for (; i < end; ++i) {
    float q = std::nearbyint((x[i] - lo) / scale);
    q = q > 0.0f ? q : 0.0f;
    q = q > top ? top : q;
    codes[i] = static_cast<int8_t>(static_cast<int32_t>(q - offset));
    odd |= !(std::fabs(x[i]) < kInf);
  }
  return odd != 0;
}

// The same with stochastic rounding (stochastic_span's noise and arithmetic), for a
// range measured over finite values: x - lo is never negative.
void int8_stochastic_span(const float* __restrict__ x, int8_t* __restrict__ codes, float lo,
                          float scale, float top, float offset, uint32_t seed, int64_t begin,
                          int64_t end) {
  const v8f offset8 = splat(offset);
  stochastic_levels(
      x, lo, scale, top, seed, begin, end,
      [=](int64_t i, v8f q) {
        v8i c = __builtin_convertvector(q - offset8, v8i);
#if defined(__AVX2__)  // eight int32 in [-128, 127] narrowed to eight bytes
        __m256i wide;
        std::memcpy(&wide, &c, sizeof wide);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(wide),
                                              _mm256_extracti128_si256(wide, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packs_epi16(words, words));
#else
        for (int k = 0; k < 8; ++k) codes[i + k] = static_cast<int8_t>(c[k]);
#endif
      },
      [=](int64_t i, float q) {
        codes[i] = static_cast<int8_t>(static_cast<int32_t>(q - offset));
      });
}

void rows_span(const float* __restrict__ x, float* __restrict__ out, int64_t cols, float levels,
               int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const float* __restrict__ row = x + r * cols;
    float* __restrict__ dst = out + r * cols;
    float lo = kInf, hi = -kInf;
    bool bad = false;
    range_block(row, cols, lo, hi, bad);
    if (lo > hi) lo = hi = 0.0f;
    const float scale = scale_of(lo, hi, levels);
    for (int64_t i = 0; i < cols; ++i) dst[i] = std::nearbyint((row[i] - lo) / scale) * scale + lo;
  }
}

// The 16 x 16 byte block at src (rows `sstride` apart) transposed into dst (rows
// `dstride` apart), XOR-ed with `flip`: four rounds of interleaving, 8-, 16-, 32- and 64-bit.
#if defined(__SSE2__)
inline void transpose16(const int8_t* src, int64_t sstride, int8_t* dst, int64_t dstride,
                        int flip) {
  __m128i r[16], a[16], b[16], c[16];
  for (int i = 0; i < 16; ++i)
    r[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * sstride));
  for (int k = 0; k < 8; ++k) {  // a[8h + k]: columns 8h..8h+7, rows 2k and 2k+1
    a[k] = _mm_unpacklo_epi8(r[2 * k], r[2 * k + 1]);
    a[8 + k] = _mm_unpackhi_epi8(r[2 * k], r[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h)  // b[4g + m]: columns 4g..4g+3, rows 4m..4m+3
    for (int m = 0; m < 4; ++m) {
      b[4 * (2 * h) + m] = _mm_unpacklo_epi16(a[8 * h + 2 * m], a[8 * h + 2 * m + 1]);
      b[4 * (2 * h + 1) + m] = _mm_unpackhi_epi16(a[8 * h + 2 * m], a[8 * h + 2 * m + 1]);
    }
  for (int g = 0; g < 4; ++g)  // c[2p + n]: columns 2p and 2p+1, rows 8n..8n+7
    for (int n = 0; n < 2; ++n) {
      c[2 * (2 * g) + n] = _mm_unpacklo_epi32(b[4 * g + 2 * n], b[4 * g + 2 * n + 1]);
      c[2 * (2 * g + 1) + n] = _mm_unpackhi_epi32(b[4 * g + 2 * n], b[4 * g + 2 * n + 1]);
    }
  const __m128i mask = _mm_set1_epi8(static_cast<char>(flip));
  for (int p = 0; p < 8; ++p) {  // column 2p, then 2p+1: rows 0..15
    __m128i lo = _mm_unpacklo_epi64(c[2 * p], c[2 * p + 1]);
    __m128i hi = _mm_unpackhi_epi64(c[2 * p], c[2 * p + 1]);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * p) * dstride), _mm_xor_si128(lo, mask));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * p + 1) * dstride),
                     _mm_xor_si128(hi, mask));
  }
}
#else
inline void transpose16(const int8_t* src, int64_t sstride, int8_t* dst, int64_t dstride,
                        int flip) {
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      dst[j * dstride + i] = static_cast<int8_t>(src[i * sstride + j] ^ flip);
}
#endif


// ReLU (top = inf) or ReLU6 (top = 6) keeping one bit an element for its backward:
// y = x < 0 ? 0 : x, then top < y ? top : y (ATen's relu and hardtanh(0, top): -0.0 and nan
// pass as they are), and bit i of bits[i / 8] set where backward passes the gradient, where
// ATen's does: for ReLU where !(y <= 0) (threshold_backward on its output), for ReLU6 where
// !(x <= 0 || x >= top) (hardtanh_backward on its input); both for a nan.
const v8i kLaneBits = {1, 2, 4, 8, 16, 32, 64, 128};

inline uint8_t lane_byte(v8i keep) {
#if defined(__AVX__)
  __m256 m;
  std::memcpy(&m, &keep, sizeof m);
  return static_cast<uint8_t>(_mm256_movemask_ps(m));
#else
  v8i b = keep & kLaneBits;
  int out = 0;
  for (int l = 0; l < 8; ++l) out |= b[l];
  return static_cast<uint8_t>(out);
#endif
}

inline float relu_of(float x, float top, bool& keep) {
  float y = x < 0.0f ? 0.0f : x;
  keep = !(x <= 0.0f) && !(top < kInf && x >= top);
  return top < y ? top : y;
}

// Elements [8 * b, 8 * e): whole bytes of bits. y may be x (in place): each block of eight
// is read before it is written.
template <bool kTop>
void relu_bits_span(const float* x, float* y, uint8_t* __restrict__ bits, float top, int64_t b,
                    int64_t e) {
  const v8f zero = splat(0.0f), tops = splat(top);
  for (int64_t k = b; k < e; ++k) {
    v8f a;
    std::memcpy(&a, x + 8 * k, sizeof a);
    v8f out = a < zero ? zero : a;
    v8i keep = ~(a <= zero);
    if constexpr (kTop) {
      out = tops < out ? tops : out;
      keep &= ~(a >= tops);
    }
    std::memcpy(y + 8 * k, &out, sizeof out);
    bits[k] = lane_byte(keep);
  }
}

void relu_grad_span(const float* __restrict__ g, const uint8_t* __restrict__ bits,
                    float* __restrict__ out, int64_t b, int64_t e) {
  const v8f zero = splat(0.0f);
  for (int64_t k = b; k < e; ++k) {
    v8f a;
    std::memcpy(&a, g + 8 * k, sizeof a);
    const int32_t byte = bits[k];
    v8i on = v8i{byte, byte, byte, byte, byte, byte, byte, byte} & kLaneBits;
    v8f r = on != 0 ? a : zero;
    std::memcpy(out + 8 * k, &r, sizeof r);
  }
}

}  // namespace

extern "C" {

// Finite min and max of x[0, n) into out[0], out[1] ([0, 0] if none is finite); returns 1
// if x holds an inf or a nan.
int dpc_range(const float* x, int64_t n, float* out, int nthreads) {
  float lo = kInf, hi = -kInf;
  bool bad = false;
  int t = threads_for(n, nthreads);
#pragma omp parallel num_threads(t) if (t > 1) reduction(min : lo) reduction(max : hi) \
    reduction(|| : bad)
  {
    int64_t k = omp_get_thread_num(), parts = omp_get_num_threads();
    int64_t begin = n * k / parts, end = n * (k + 1) / parts;
    range_block(x + begin, end - begin, lo, hi, bad);
  }
  if (lo > hi) lo = hi = 0.0f;
  out[0] = lo;
  out[1] = hi;
  return bad ? 1 : 0;
}

// Nearest-rounding quantise of x[0, n) over [lo, hi] onto levels + 1 steps: the floats
// into xhat (inf/nan passed through), and, if packed is not null, the codes packed to
// `bits` bits by planes. kernels.quantize_codes / quantize_codes_in_range / fake_quant.
void dpc_quantize(const float* x, int64_t n, float lo, float hi, float levels, int bits,
                  float* xhat, uint8_t* packed, int nthreads) {
  const float scale = scale_of(lo, hi, levels);
  const float top = hi > lo ? levels : 0.0f;
  const int t = threads_for(n, nthreads);
  if (!packed) {
    split(n, t, [=](int64_t b, int64_t e) { fake_quant_span(x, xhat, lo, scale, top, b, e); });
    return;
  }
  const int parts = parts_of(bits);
  const int64_t m = n / parts;
  split(m, t, [=](int64_t b, int64_t e) {
    quantize_planes(x, xhat, packed, m, parts, lo, scale, top, b, e);
  });
  const int64_t bytes = plane_bytes(m, parts);
  for (int64_t j = parts * m; j < n; ++j) {  // the remainder, a byte a code
    float q = code_of(x[j], lo, scale, top);
    xhat[j] = value_of(x[j], q, lo, scale);
    packed[bytes + j - parts * m] = byte(q);
  }
}

// The n floats that codes packed by dpc_quantize stand for, into out; all nan if `bad`
// (the quantised tensor held a non-finite value). kernels.dequantize_codes after unpack.
void dpc_dequantize(const uint8_t* packed, int64_t n, int bits, float lo, float hi,
                    float levels, int bad, float* out, int nthreads) {
  if (bad) {
    std::fill(out, out + n, std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float scale = scale_of(lo, hi, levels);
  const int parts = parts_of(bits);
  const int64_t m = n / parts;
  split(m, threads_for(n, nthreads),
        [=](int64_t b, int64_t e) { dequantize_planes(packed, out, m, parts, lo, scale, b, e); });
  const int64_t bytes = plane_bytes(m, parts);
  for (int64_t j = parts * m; j < n; ++j)
    out[j] = static_cast<float>(packed[bytes + j - parts * m]) * scale + lo;
}

// Stochastic-rounding quantise of x[0, n) over its finite range [lo, hi], with the noise
// of kernels._uniform (a murmur3-style mix of the element's index and the seed, in 32-bit
// arithmetic). kernels.fake_quant_stochastic / fake_quant_stochastic_in_range. out may be
// x: the gradient an autograd node owns alone is rounded in place (csrc/layer.cpp).
void dpc_stochastic(const float* x, int64_t n, float lo, float hi, float levels, int64_t seed,
                    float* out, int nthreads) {
  const float scale = scale_of(lo, hi, levels);
  const float top = hi > lo ? levels : 0.0f;
  const uint32_t s = static_cast<uint32_t>(seed);
  split(n, threads_for(n, nthreads),
        [=](int64_t b, int64_t e) { stochastic_span(x, out, lo, scale, top, s, b, e); });
}

// Per-row range and nearest-rounding quantise of the (rows, cols) matrix x into out, each
// row over its own finite range. kernels.fake_quant_channels.
void dpc_fake_quant_rows(const float* x, int64_t rows, int64_t cols, float levels, float* out,
                         int nthreads) {
  int t = threads_for(rows * cols, nthreads);
  t = rows < t ? static_cast<int>(rows) : t;
  split(rows, t, [=](int64_t b, int64_t e) { rows_span(x, out, cols, levels, b, e); });
}

// dpc_range, then dpc_quantize over the range found (written to range[0], range[1]), in
// one call; returns dpc_range's flag.
int dpc_quantize_measured(const float* x, int64_t n, float levels, int bits, float* xhat,
                          uint8_t* packed, float* range, int nthreads) {
  int bad = dpc_range(x, n, range, nthreads);
  dpc_quantize(x, n, range[0], range[1], levels, bits, xhat, packed, nthreads);
  return bad;
}

// dpc_range, then dpc_stochastic over the range found, in one call.
void dpc_stochastic_measured(const float* x, int64_t n, float levels, int64_t seed, float* out,
                             int nthreads) {
  float range[2];
  dpc_range(x, n, range, nthreads);
  dpc_stochastic(x, n, range[0], range[1], levels, seed, out, nthreads);
}

// Row sums of the int8 matrix q (rows x cols, row-major) into out[rows], as int32: the
// corrections of an integer product of codes (dpc_fx/int8.py).
void dpc_int8_row_sums(const int8_t* q, int64_t rows, int64_t cols, int32_t* out, int nthreads) {
  split(rows, threads_for(rows * cols, nthreads), [=](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const int8_t* __restrict__ row = q + r * cols;
      int32_t sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += row[c];
      out[r] = sum;
    }
  });
}

// Column sums of the same, into out[cols]: each thread a block of columns, row by row.
void dpc_int8_col_sums(const int8_t* q, int64_t rows, int64_t cols, int32_t* out, int nthreads) {
  split(cols, threads_for(rows * cols, nthreads), [=](int64_t b, int64_t e) {
    int32_t* __restrict__ sums = out;
    for (int64_t c = b; c < e; ++c) sums[c] = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* __restrict__ row = q + r * cols;
      for (int64_t c = b; c < e; ++c) sums[c] += row[c];
    }
  });
}

// The float product of an integer one, in place: y (rows x cols, row-major, the integer
// product as floats) becomes a * y + r * rows[i] + column[j], where column[j] = c * cols[j]
// + k, plus bias[j] if bias is not null: int8._combine's arithmetic in its order (a = sa *
// sb, r = sa * mb, c = ma * sb, k = K * ma * mb, each rounded to float32 as the torch
// kernel rounds it). One pass over y, each thread a band of rows.
void dpc_int8_combine(float* y, int64_t rows, int64_t cols, const int32_t* row_sums,
                      const int32_t* col_sums, const float* bias, float a, float r, float c,
                      float k, int nthreads) {
  std::vector<float> column(cols);
  for (int64_t j = 0; j < cols; ++j) {
    column[j] = c * static_cast<float>(col_sums[j]) + k;
    if (bias) column[j] = column[j] + bias[j];
  }
  const float* __restrict__ col = column.data();
  split(rows, threads_for(rows * cols, nthreads), [=](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      float* __restrict__ out = y + i * cols;
      const float row = r * static_cast<float>(row_sums[i]);
      for (int64_t j = 0; j < cols; ++j) out[j] = (a * out[j] + row) + col[j];
    }
  });
}

// dst (cols x rows) = the transpose of the int8 matrix src (rows x cols), every byte
// XOR-ed with `flip` (128 turns int8 codes into the u8 codes of a kernel whose zero point
// is 128; 0 copies them as they are): the dense layouts an integer kernel reads, in one
// pass. Blocks of 16 x 16 bytes are transposed in registers; a thread takes bands of
// kBand rows and walks them 16 columns at a time, so each line it writes is filled
// while it is still in cache.
void dpc_int8_transpose(const int8_t* src, int64_t rows, int64_t cols, int flip, int8_t* dst,
                        int nthreads) {
  constexpr int64_t kBand = 64;
  const int64_t bands = (rows + kBand - 1) / kBand;
  split(bands, threads_for(rows * cols, nthreads), [=](int64_t b, int64_t e) {
    const int64_t r_end = std::min(e * kBand, rows);
    for (int64_t r0 = b * kBand; r0 < r_end; r0 += kBand) {
      const int64_t r1 = std::min(r0 + kBand, rows);
      int64_t c0 = 0;
      for (; c0 + 16 <= cols; c0 += 16) {
        int64_t r = r0;
        for (; r + 16 <= r1; r += 16)
          transpose16(src + r * cols + c0, cols, dst + c0 * rows + r, rows, flip);
        for (; r < r1; ++r)  // the band's last rows, fewer than 16
          for (int64_t c = c0; c < c0 + 16; ++c)
            dst[c * rows + r] = static_cast<int8_t>(src[r * cols + c] ^ flip);
      }
      for (int64_t r = r0; r < r1; ++r)  // the last columns, fewer than 16
        for (int64_t c = c0; c < cols; ++c)
          dst[c * rows + r] = static_cast<int8_t>(src[r * cols + c] ^ flip);
    }
  });
}

// int8 codes of x[0, n) over [lo, hi] (nearest rounding) for the integer kernels:
// kernels.quantize_int8's codes, for levels <= 255. Returns 1 if x holds an inf or a nan:
// the codes are then not to be used (the torch kernel flags the rows that held one).
int dpc_int8_codes(const float* x, int64_t n, float lo, float hi, float levels, int8_t* codes,
                   int nthreads) {
  const float scale = scale_of(lo, hi, levels);
  const float top = hi > lo ? levels : 0.0f;
  const float offset = std::floor(levels / 2.0f + 0.5f);
  const int t = threads_for(n, nthreads);
  int bad = 0;
#pragma omp parallel num_threads(t) if (t > 1) reduction(| : bad)
  {
    int64_t k = omp_get_thread_num(), parts = omp_get_num_threads();
    bad |= int8_codes_span(x, codes, lo, scale, top, offset, n * k / parts,
                           n * (k + 1) / parts);
  }
  return bad;
}

// The range of x[0, n) into range[0..1], then its int8 codes with stochastic rounding:
// kernels.quantize_int8_stochastic's codes. Returns 1 (and writes no code) if x holds an
// inf or a nan.
int dpc_int8_stochastic(const float* x, int64_t n, float levels, int64_t seed, int8_t* codes,
                        float* range, int nthreads) {
  if (dpc_range(x, n, range, nthreads)) return 1;
  const float lo = range[0], hi = range[1];
  const float scale = scale_of(lo, hi, levels);
  const float top = hi > lo ? levels : 0.0f;
  const float offset = std::floor(levels / 2.0f + 0.5f);
  const uint32_t s = static_cast<uint32_t>(seed);
  split(n, threads_for(n, nthreads), [=](int64_t b, int64_t e) {
    int8_stochastic_span(x, codes, lo, scale, top, offset, s, b, e);
  });
  return 0;
}

// ReLU (top = inf) or ReLU6 (top = 6) of x[0, n) into y, and into bits ((n + 7) / 8 bytes)
// where its backward passes the gradient (see relu_of).
void dpc_relu_bits(const float* x, int64_t n, float top, float* y, uint8_t* bits,
                   int nthreads) {
  const int64_t whole = n / 8;
  const int t = threads_for(n, nthreads);
  if (top < kInf) {
    split(whole, t, [=](int64_t b, int64_t e) { relu_bits_span<true>(x, y, bits, top, b, e); });
  } else {
    split(whole, t, [=](int64_t b, int64_t e) { relu_bits_span<false>(x, y, bits, top, b, e); });
  }
  if (n % 8 == 0) return;
  int last = 0;
  for (int64_t i = 8 * whole; i < n; ++i) {
    bool keep;
    y[i] = relu_of(x[i], top, keep);
    if (keep) last |= 1 << (i - 8 * whole);
  }
  bits[whole] = static_cast<uint8_t>(last);
}

// ReLU's backward from its bits: out[i] = g[i] where bit i is set, else 0.
void dpc_relu_grad(const float* g, const uint8_t* bits, int64_t n, float* out, int nthreads) {
  const int64_t whole = n / 8;
  split(whole, threads_for(n, nthreads),
        [=](int64_t b, int64_t e) { relu_grad_span(g, bits, out, b, e); });
  for (int64_t i = 8 * whole; i < n; ++i)
    out[i] = (bits[whole] >> (i - 8 * whole)) & 1 ? g[i] : 0.0f;
}

}  // extern "C"
