// Lookup-table kernels on packed codes, registered as torch operators (wclust::*).
//
// Codes come in one of two kernel layouts, derived at load from the canonical file
// packing (wclust.core.packing):
//   nibbles (code_bits 4): (out, in / 2) uint8, byte k of a row holds inputs 2k (low
//     nibble) and 2k + 1 (high); codes of 2 or 3 bits are widened to 4.
//   bytes (code_bits 8): (out, in) uint8, one code per byte (codes of 5 to 8 bits).
// The codebook is (1, K) for the tensor or (out, K) one per row; optional scale and
// offset per group of consecutive inputs of a row, (out * in / group,) row-major.
// A weight is codebook[row or 0][code] * scale[g] + offset[g].
//
// The 4-bit kernels keep a group's 16 weights (codebook * scale + offset, one FMA per
// group) in one AVX-512 register and look up 16 codes at once with vpermps (two
// 8-lane permutes and a blend on AVX2); byte codes keep the whole codebook (up to 256
// entries) in registers on AVX-512 and use gathers on AVX2. Up to kMaxBatch input rows
// share each look-up; with more rows each thread decodes blocks of the weight and
// calls the BLAS matmul on them. Threads come from torch's own pool (at::parallel_for), so nothing
// competes with torch's OpenMP threads. The instruction set is chosen at run time
// (__builtin_cpu_supports), so one build runs on any x86-64 CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define WCLUST_X86 1
#endif

namespace wclust {
namespace {

constexpr int kMaxBatch = 8;

enum Isa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

int detect_isa() {
#ifdef WCLUST_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kPortable;
}

int best_isa() {
  static const int best = detect_isa();
  return best;
}

int initial_isa() {
  // WCLUST_ISA=portable|avx2|avx512 caps the instruction set (tests, comparisons).
  int isa = best_isa();
  if (const char* env = std::getenv("WCLUST_ISA")) {
    std::string s(env);
    if (s == "portable") isa = kPortable;
    else if (s == "avx2") isa = std::min(isa, static_cast<int>(kAvx2));
  }
  return isa;
}

std::atomic<int>& active_isa() {
  static std::atomic<int> isa{initial_isa()};
  return isa;
}

const char* isa_name(int isa) {
  return isa == kAvx512 ? "avx512" : isa == kAvx2 ? "avx2" : "portable";
}

// What one call needs, read once from the tensors.
struct Weight {
  const uint8_t* codes;
  int64_t out_f, in_f, row_bytes;
  bool nibbles;               // 4-bit pairs, else one code per byte
  const float* cb;            // (n_cb, K)
  int64_t cb_stride;          // K for one codebook per row, 0 for one per tensor
  int64_t K;
  const float* scale;         // (out, n_groups) or null
  const float* offset;        // (out, n_groups) or null
  int64_t n_groups, group;    // groups per row, inputs per group
};

Weight make_weight(const at::Tensor& codes, int64_t code_bits, const at::Tensor& cb,
                   const c10::optional<at::Tensor>& scale,
                   const c10::optional<at::Tensor>& offset) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "wclust: codes must be a contiguous 2-D uint8 tensor");
  TORCH_CHECK(code_bits == 4 || code_bits == 8, "wclust: code_bits must be 4 or 8");
  TORCH_CHECK(cb.dim() == 2 && cb.scalar_type() == at::kFloat && cb.is_contiguous(),
              "wclust: codebook must be a contiguous 2-D float32 tensor");
  Weight w{};
  w.codes = codes.data_ptr<uint8_t>();
  w.out_f = codes.size(0);
  w.row_bytes = codes.size(1);
  w.nibbles = code_bits == 4;
  w.in_f = w.nibbles ? 2 * w.row_bytes : w.row_bytes;
  TORCH_CHECK(cb.size(0) == 1 || cb.size(0) == w.out_f,
              "wclust: codebook rows must be 1 or out_features");
  w.K = cb.size(1);
  TORCH_CHECK(w.K >= 1 && w.K <= (int64_t{1} << code_bits),
              "wclust: too many codebook entries for the code width");
  w.cb = cb.data_ptr<float>();
  w.cb_stride = cb.size(0) > 1 ? w.K : 0;
  w.n_groups = 1;
  w.group = w.in_f;
  if (scale.has_value()) {
    const auto& s = *scale;
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous(),
                "wclust: scale must be contiguous float32");
    TORCH_CHECK(w.out_f > 0 && s.numel() % w.out_f == 0 && s.numel() >= w.out_f,
                "wclust: scale groups must lie within rows");
    w.n_groups = s.numel() / w.out_f;
    TORCH_CHECK(w.in_f % w.n_groups == 0, "wclust: scale groups must divide a row");
    w.group = w.in_f / w.n_groups;
    TORCH_CHECK(!w.nibbles || w.group % 2 == 0, "wclust: 4-bit groups must be even");
    w.scale = s.data_ptr<float>();
    if (offset.has_value()) {
      TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->is_contiguous() &&
                      offset->numel() == s.numel(),
                  "wclust: offset must be contiguous float32 shaped like scale");
      w.offset = offset->data_ptr<float>();
    }
  } else {
    TORCH_CHECK(!offset.has_value(), "wclust: an offset needs a scale");
  }
  return w;
}

inline uint8_t code_at(const Weight& w, int64_t o, int64_t j) {
  const uint8_t* r = w.codes + o * w.row_bytes;
  return w.nibbles ? ((r[j >> 1] >> ((j & 1) * 4)) & 15) : r[j];
}

// The row's (scaled) table of one group: t[c] = cb[c] * s + b, K entries padded to 16
// (4-bit) or 256 (8-bit) with zeros. 8-bit tables only when scaled (else cb is read).
inline void group_table(const Weight& w, int64_t o, int64_t g, float* t, int64_t size) {
  const float* c = w.cb + o * w.cb_stride;
  float s = w.scale ? w.scale[o * w.n_groups + g] : 1.f;
  float b = w.offset ? w.offset[o * w.n_groups + g] : 0.f;
  int64_t k = std::min(w.K, size);
  for (int64_t i = 0; i < k; ++i) t[i] = c[i] * s + b;
  for (int64_t i = k; i < size; ++i) t[i] = 0.f;
}

// The inputs' sum per (row of x, scale group), which a group's offset multiplies;
// empty without offsets.
std::vector<float> group_input_sums(const Weight& w, const float* x, int nb, int64_t ldx) {
  std::vector<float> xsum;
  if (!w.offset) return xsum;
  xsum.assign(nb * w.n_groups, 0.f);
  for (int b = 0; b < nb; ++b)
    for (int64_t g = 0; g < w.n_groups; ++g)
      for (int64_t j = g * w.group; j < (g + 1) * w.group; ++j)
        xsum[b * w.n_groups + g] += x[b * ldx + j];
  return xsum;
}

// Row o's unscaled codebook into t, which the caller zeroed to 256 entries once (codes
// past K read 0, never garbage); a codebook shared by the tensor is copied for the
// first row only.
inline void row_codebook(const Weight& w, int64_t o, int64_t o0, float* t) {
  if (w.cb_stride || o == o0) std::memcpy(t, w.cb + o * w.cb_stride, w.K * sizeof(float));
}

// ---------------------------------------------------------------- portable ----------

void rows_portable(const Weight& w, const float* x, int64_t n, int64_t ldx, float* y,
                   int64_t ldy, int64_t o0, int64_t o1) {
  std::vector<float> t(w.nibbles ? 16 : 256);
  float acc[kMaxBatch];
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t b = 0; b < n; ++b) acc[b] = 0.f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      group_table(w, o, g, t.data(), std::min<int64_t>(t.size(), w.K));
      for (int64_t j = g * w.group; j < (g + 1) * w.group; ++j) {
        float v = t[code_at(w, o, j)];
        for (int64_t b = 0; b < n; ++b) acc[b] += v * x[b * ldx + j];
      }
    }
    for (int64_t b = 0; b < n; ++b) y[b * ldy + o] = acc[b];
  }
}

void decode_portable(const Weight& w, float* out, int64_t o0, int64_t o1) {
  std::vector<float> t(w.nibbles ? 16 : 256);
  for (int64_t o = o0; o < o1; ++o) {
    float* r = out + (o - o0) * w.in_f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      group_table(w, o, g, t.data(), std::min<int64_t>(t.size(), w.K));
      for (int64_t j = g * w.group; j < (g + 1) * w.group; ++j) r[j] = t[code_at(w, o, j)];
    }
  }
}

#ifdef WCLUST_X86
// ---------------------------------------------------------------- AVX-512 -----------

__attribute__((target("avx512f"))) inline float hsum512(__m512 v) {
  return _mm512_reduce_add_ps(v);
}

// 16 bytes of nibble codes -> the 32 weights they code (two registers, input order).
__attribute__((target("avx512f"))) inline void lookup32_512(const uint8_t* p, __m512 t,
                                                            __m512& w0, __m512& w1) {
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(15);
  __m128i lo = _mm_and_si128(bytes, m);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
  w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), t);
  w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), t);
}

__attribute__((target("avx512f"))) inline __m512 lookup16_512(const uint8_t* p, __m512 t) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(15);
  __m128i lo = _mm_and_si128(bytes, m);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
  return _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), t);
}

// The row's group table in a register: codebook (zero-padded to 16) * scale + offset.
__attribute__((target("avx512f"))) inline __m512 table16_512(const Weight& w, int64_t o,
                                                             int64_t g) {
  const float* c = w.cb + o * w.cb_stride;
  __m512 t = w.K >= 16 ? _mm512_loadu_ps(c)
                       : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << w.K) - 1), c);
  if (!w.scale) return t;
  const int64_t i = o * w.n_groups + g;
  return _mm512_fmadd_ps(t, _mm512_set1_ps(w.scale[i]),
                         _mm512_set1_ps(w.offset ? w.offset[i] : 0.f));
}

template <int NB>
__attribute__((target("avx512f"))) void rows4_avx512(const Weight& w, const float* x,
                                                     int64_t ldx, float* y, int64_t ldy,
                                                     int64_t o0, int64_t o1) {
  alignas(64) float t[16];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* r = w.codes + o * w.row_bytes;
    __m512 acc[NB], acc2[NB];  // two chains per row of x: FMA latency, not throughput
    float tail[NB];
    for (int b = 0; b < NB; ++b) acc[b] = acc2[b] = _mm512_setzero_ps(), tail[b] = 0.f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      __m512 tv = table16_512(w, o, g);
      if (w.group % 32) _mm512_store_ps(t, tv);  // the scalar tail reads it
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 32 <= end; j += 32) {
        __m512 w0, w1;
        lookup32_512(r + j / 2, tv, w0, w1);
        for (int b = 0; b < NB; ++b) {
          const float* xb = x + b * ldx + j;
          acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[b]);
          acc2[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc2[b]);
        }
      }
      if (j + 16 <= end) {
        __m512 w0 = lookup16_512(r + j / 2, tv);
        for (int b = 0; b < NB; ++b)
          acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + b * ldx + j), acc[b]);
        j += 16;
      }
      for (; j < end; ++j) {
        float v = t[(r[j >> 1] >> ((j & 1) * 4)) & 15];
        for (int b = 0; b < NB; ++b) tail[b] += v * x[b * ldx + j];
      }
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + o] = hsum512(_mm512_add_ps(acc[b], acc2[b])) + tail[b];
  }
}

// Groups of C x 32 inputs (C = 0: any multiple of 32; without scales a group is a
// row): the row's codebook is loaded once and scaled per group in a register; a
// compile-time C unrolls the group.
template <int C>
__attribute__((target("avx512f"))) void decode4s_avx512(const Weight& w, float* out,
                                                        int64_t o0, int64_t o1) {
  const int64_t chunks = C ? C : w.group / 32;
  for (int64_t o = o0; o < o1; ++o) {
    const float* c = w.cb + o * w.cb_stride;
    const __m512 base = w.K >= 16
                            ? _mm512_loadu_ps(c)
                            : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << w.K) - 1), c);
    const float* s = w.scale ? w.scale + o * w.n_groups : nullptr;
    const float* f = w.offset ? w.offset + o * w.n_groups : nullptr;
    const uint8_t* r = w.codes + o * w.row_bytes;
    float* d = out + (o - o0) * w.in_f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const __m512 tv = s ? _mm512_fmadd_ps(base, _mm512_set1_ps(s[g]),
                                            f ? _mm512_set1_ps(f[g]) : _mm512_setzero_ps())
                          : base;
      for (int64_t k = 0; k < chunks; ++k, r += 16, d += 32) {
        __m512 w0, w1;
        lookup32_512(r, tv, w0, w1);
        _mm512_storeu_ps(d, w0);
        _mm512_storeu_ps(d + 16, w1);
      }
    }
  }
}

__attribute__((target("avx512f"))) void decode4_avx512(const Weight& w, float* out,
                                                       int64_t o0, int64_t o1) {
  if (w.group % 32 == 0) {
    switch (w.group / 32) {
      case 1: return decode4s_avx512<1>(w, out, o0, o1);
      case 2: return decode4s_avx512<2>(w, out, o0, o1);
      case 4: return decode4s_avx512<4>(w, out, o0, o1);
      default: return decode4s_avx512<0>(w, out, o0, o1);
    }
  }
  alignas(64) float t[16];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* r = w.codes + o * w.row_bytes;
    float* d = out + (o - o0) * w.in_f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      __m512 tv = table16_512(w, o, g);
      if (w.group % 32) _mm512_store_ps(t, tv);  // the scalar tail reads it
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 32 <= end; j += 32) {
        __m512 w0, w1;
        lookup32_512(r + j / 2, tv, w0, w1);
        _mm512_storeu_ps(d + j, w0);
        _mm512_storeu_ps(d + j + 16, w1);
      }
      for (; j < end; ++j) d[j] = t[(r[j >> 1] >> ((j & 1) * 4)) & 15];
    }
  }
}

// 5- to 8-bit codes: a row's unscaled codebook (zero-padded to a multiple of 32
// entries, at most 256) lives in registers, and 16 codes are looked up with one
// vpermt2ps per 32 entries and a blend tree on the code's bits 5-7 (at K = 256: 8
// permutes and 7 blends). On these CPUs a gather of 16 floats costs more than the
// permute tree, even for 256 entries.
template <int P>  // 32-entry register pairs: 1, 2, 4 or 8
struct ByteTable512 {
  __m512 r[2 * P];
  __attribute__((target("avx512f"), always_inline)) void load(const float* t) {
    for (int i = 0; i < 2 * P; ++i) r[i] = _mm512_loadu_ps(t + 16 * i);
  }
  __attribute__((target("avx512f"), always_inline)) __m512 pair(int i, __m512i idx) const {
    return _mm512_permutex2var_ps(r[2 * i], idx, r[2 * i + 1]);
  }
  __attribute__((target("avx512f"), always_inline)) __m512 lookup(__m512i idx) const {
    if constexpr (P == 1) {
      return pair(0, idx);
    } else {
      const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
      __m512 v = _mm512_mask_blend_ps(b5, pair(0, idx), pair(1, idx));
      if constexpr (P >= 4) {
        const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
        v = _mm512_mask_blend_ps(b6, v, _mm512_mask_blend_ps(b5, pair(2, idx), pair(3, idx)));
        if constexpr (P == 8) {
          __m512 q = _mm512_mask_blend_ps(b6,
                                          _mm512_mask_blend_ps(b5, pair(4, idx), pair(5, idx)),
                                          _mm512_mask_blend_ps(b5, pair(6, idx), pair(7, idx)));
          v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(128)), v, q);
        }
      }
      return v;
    }
  }
};

// The table's register pairs for K entries.
inline int table_pairs(int64_t K) { return K <= 32 ? 1 : K <= 64 ? 2 : K <= 128 ? 4 : 8; }

__attribute__((target("avx512f"), always_inline)) inline __m512i codes16(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// A group's sum is scaled once (s * sum(cb[c] x) + off * sum(x)) instead of building
// a scaled table for every group of every row.
template <int NB, int P>
__attribute__((target("avx512f"))) void rows8p_avx512(const Weight& w, const float* x,
                                                      int64_t ldx, float* y, int64_t ldy,
                                                      int64_t o0, int64_t o1) {
  alignas(64) float t[256];
  std::memset(t, 0, sizeof(t));  // codes past the codebook read 0, never garbage
  const std::vector<float> xsum = group_input_sums(w, x, NB, ldx);
  ByteTable512<P> bt;
  for (int64_t o = o0; o < o1; ++o) {
    row_codebook(w, o, o0, t);
    bt.load(t);
    const uint8_t* r = w.codes + o * w.row_bytes;
    __m512 acc[NB];
    float tail[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm512_setzero_ps(), tail[b] = 0.f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      __m512 gacc[NB];
      float gtail[NB];
      for (int b = 0; b < NB; ++b) gacc[b] = _mm512_setzero_ps(), gtail[b] = 0.f;
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 16 <= end; j += 16) {
        const __m512 wv = bt.lookup(codes16(r + j));
        for (int b = 0; b < NB; ++b)
          gacc[b] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * ldx + j), gacc[b]);
      }
      for (; j < end; ++j)
        for (int b = 0; b < NB; ++b) gtail[b] += t[r[j]] * x[b * ldx + j];
      if (w.scale) {
        const float sc = w.scale[o * w.n_groups + g];
        const __m512 sv = _mm512_set1_ps(sc);
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm512_fmadd_ps(sv, gacc[b], acc[b]);
          tail[b] += sc * gtail[b];
          if (w.offset) tail[b] += w.offset[o * w.n_groups + g] * xsum[b * w.n_groups + g];
        }
      } else {
        for (int b = 0; b < NB; ++b) acc[b] = _mm512_add_ps(acc[b], gacc[b]), tail[b] += gtail[b];
      }
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + o] = hsum512(acc[b]) + tail[b];
  }
}

template <int NB>
void rows8_avx512(const Weight& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                  int64_t o0, int64_t o1) {
  switch (table_pairs(w.K)) {
    case 1: return rows8p_avx512<NB, 1>(w, x, ldx, y, ldy, o0, o1);
    case 2: return rows8p_avx512<NB, 2>(w, x, ldx, y, ldy, o0, o1);
    case 4: return rows8p_avx512<NB, 4>(w, x, ldx, y, ldy, o0, o1);
    default: return rows8p_avx512<NB, 8>(w, x, ldx, y, ldy, o0, o1);
  }
}

template <int P>
__attribute__((target("avx512f"))) void decode8p_avx512(const Weight& w, float* out,
                                                        int64_t o0, int64_t o1) {
  alignas(64) float t[256];
  std::memset(t, 0, sizeof(t));
  ByteTable512<P> bt;
  for (int64_t o = o0; o < o1; ++o) {
    row_codebook(w, o, o0, t);
    bt.load(t);
    const uint8_t* r = w.codes + o * w.row_bytes;
    float* d = out + (o - o0) * w.in_f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      const float sc = w.scale ? w.scale[o * w.n_groups + g] : 1.f;
      const float off = w.offset ? w.offset[o * w.n_groups + g] : 0.f;
      const __m512 sv = _mm512_set1_ps(sc), ov = _mm512_set1_ps(off);
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 16 <= end; j += 16) {
        __m512 v = bt.lookup(codes16(r + j));
        _mm512_storeu_ps(d + j, w.scale ? _mm512_fmadd_ps(v, sv, ov) : v);
      }
      for (; j < end; ++j) d[j] = t[r[j]] * sc + off;
    }
  }
}

void decode8_avx512(const Weight& w, float* out, int64_t o0, int64_t o1) {
  switch (table_pairs(w.K)) {
    case 1: return decode8p_avx512<1>(w, out, o0, o1);
    case 2: return decode8p_avx512<2>(w, out, o0, o1);
    case 4: return decode8p_avx512<4>(w, out, o0, o1);
    default: return decode8p_avx512<8>(w, out, o0, o1);
  }
}

// ---------------------------------------------------------------- AVX2 --------------

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 codes (epi32 lanes, 0..15) -> 8 weights from the 16-entry table (t0: 0-7, t1: 8-15).
__attribute__((target("avx2,fma"))) inline __m256 lookup8_256(__m256i idx, __m256 t0,
                                                              __m256 t1) {
  __m256 a = _mm256_permutevar8x32_ps(t0, idx);
  __m256 b = _mm256_permutevar8x32_ps(t1, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 bytes of nibble codes -> 16 weights (two registers, input order).
__attribute__((target("avx2,fma"))) inline void lookup16_256(const uint8_t* p, __m256 t0,
                                                             __m256 t1, __m256& w0,
                                                             __m256& w1) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  __m128i m = _mm_set1_epi8(15);
  __m128i lo = _mm_and_si128(bytes, m);
  __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), m);
  __m128i c = _mm_unpacklo_epi8(lo, hi);
  w0 = lookup8_256(_mm256_cvtepu8_epi32(c), t0, t1);
  w1 = lookup8_256(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)), t0, t1);
}

template <int NB>
__attribute__((target("avx2,fma"))) void rows4_avx2(const Weight& w, const float* x,
                                                    int64_t ldx, float* y, int64_t ldy,
                                                    int64_t o0, int64_t o1) {
  alignas(32) float t[16];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* r = w.codes + o * w.row_bytes;
    __m256 acc[NB];
    float tail[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps(), tail[b] = 0.f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      group_table(w, o, g, t, 16);
      __m256 t0 = _mm256_load_ps(t), t1 = _mm256_load_ps(t + 8);
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 16 <= end; j += 16) {
        __m256 w0, w1;
        lookup16_256(r + j / 2, t0, t1, w0, w1);
        for (int b = 0; b < NB; ++b) {
          const float* xb = x + b * ldx + j;
          acc[b] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[b]);
          acc[b] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb + 8), acc[b]);
        }
      }
      for (; j < end; ++j) {
        float v = t[(r[j >> 1] >> ((j & 1) * 4)) & 15];
        for (int b = 0; b < NB; ++b) tail[b] += v * x[b * ldx + j];
      }
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + o] = hsum256(acc[b]) + tail[b];
  }
}

__attribute__((target("avx2,fma"))) void decode4_avx2(const Weight& w, float* out,
                                                      int64_t o0, int64_t o1) {
  alignas(32) float t[16];
  for (int64_t o = o0; o < o1; ++o) {
    const uint8_t* r = w.codes + o * w.row_bytes;
    float* d = out + (o - o0) * w.in_f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      group_table(w, o, g, t, 16);
      __m256 t0 = _mm256_load_ps(t), t1 = _mm256_load_ps(t + 8);
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 16 <= end; j += 16) {
        __m256 w0, w1;
        lookup16_256(r + j / 2, t0, t1, w0, w1);
        _mm256_storeu_ps(d + j, w0);
        _mm256_storeu_ps(d + j + 8, w1);
      }
      for (; j < end; ++j) d[j] = t[(r[j >> 1] >> ((j & 1) * 4)) & 15];
    }
  }
}

// 5- to 8-bit codes: gathers from the row's unscaled codebook; a group's sum is scaled
// once (s * sum(cb[c] x) + off * sum(x)), as on AVX-512.
template <int NB>
__attribute__((target("avx2,fma"))) void rows8_avx2(const Weight& w, const float* x,
                                                    int64_t ldx, float* y, int64_t ldy,
                                                    int64_t o0, int64_t o1) {
  alignas(32) float t[256];
  std::memset(t, 0, sizeof(t));  // codes past the codebook read 0, never garbage
  const std::vector<float> xsum = group_input_sums(w, x, NB, ldx);
  for (int64_t o = o0; o < o1; ++o) {
    row_codebook(w, o, o0, t);
    const uint8_t* r = w.codes + o * w.row_bytes;
    __m256 acc[NB];
    float tail[NB];
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_setzero_ps(), tail[b] = 0.f;
    for (int64_t g = 0; g < w.n_groups; ++g) {
      __m256 gacc[NB];
      float gtail[NB];
      for (int b = 0; b < NB; ++b) gacc[b] = _mm256_setzero_ps(), gtail[b] = 0.f;
      int64_t j = g * w.group, end = (g + 1) * w.group;
      for (; j + 8 <= end; j += 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + j)));
        __m256 wv = _mm256_i32gather_ps(t, idx, 4);
        for (int b = 0; b < NB; ++b)
          gacc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * ldx + j), gacc[b]);
      }
      for (; j < end; ++j)
        for (int b = 0; b < NB; ++b) gtail[b] += t[r[j]] * x[b * ldx + j];
      if (w.scale) {
        const float sc = w.scale[o * w.n_groups + g];
        const __m256 sv = _mm256_set1_ps(sc);
        for (int b = 0; b < NB; ++b) {
          acc[b] = _mm256_fmadd_ps(sv, gacc[b], acc[b]);
          tail[b] += sc * gtail[b];
          if (w.offset) tail[b] += w.offset[o * w.n_groups + g] * xsum[b * w.n_groups + g];
        }
      } else {
        for (int b = 0; b < NB; ++b) acc[b] = _mm256_add_ps(acc[b], gacc[b]), tail[b] += gtail[b];
      }
    }
    for (int b = 0; b < NB; ++b) y[b * ldy + o] = hsum256(acc[b]) + tail[b];
  }
}
#endif  // WCLUST_X86

// ---------------------------------------------------------------- dispatch ----------

using RowsFn = void (*)(const Weight&, const float*, int64_t, float*, int64_t, int64_t,
                        int64_t);

template <template <int> class K>
RowsFn pick_batch(int64_t n) {
  switch (n) {
    case 1: return K<1>::f;
    case 2: return K<2>::f;
    case 3: return K<3>::f;
    case 4: return K<4>::f;
    case 5: return K<5>::f;
    case 6: return K<6>::f;
    case 7: return K<7>::f;
    default: return K<8>::f;
  }
}

#ifdef WCLUST_X86
template <int NB> struct R4_512 { static constexpr RowsFn f = rows4_avx512<NB>; };
template <int NB> struct R8_512 { static constexpr RowsFn f = rows8_avx512<NB>; };
template <int NB> struct R4_256 { static constexpr RowsFn f = rows4_avx2<NB>; };
template <int NB> struct R8_256 { static constexpr RowsFn f = rows8_avx2<NB>; };
#endif

// y (n, out) = x (n, in) @ W.T for rows [o0, o1), n <= kMaxBatch.
void run_rows(const Weight& w, const float* x, int64_t n, int64_t ldx, float* y, int64_t ldy,
              int64_t o0, int64_t o1, int isa) {
#ifdef WCLUST_X86
  if (isa == kAvx512) {
    RowsFn f = w.nibbles ? pick_batch<R4_512>(n) : pick_batch<R8_512>(n);
    return f(w, x, ldx, y, ldy, o0, o1);
  }
  if (isa == kAvx2) {
    RowsFn f = w.nibbles ? pick_batch<R4_256>(n) : pick_batch<R8_256>(n);
    return f(w, x, ldx, y, ldy, o0, o1);
  }
#endif
  rows_portable(w, x, n, ldx, y, ldy, o0, o1);
}

// Rows [o0, o1) of the dense weight into out (row o at out + (o - o0) * in).
void run_decode(const Weight& w, float* out, int64_t o0, int64_t o1, int isa) {
#ifdef WCLUST_X86
  if (isa == kAvx512) return w.nibbles ? decode4_avx512(w, out, o0, o1)
                                        : decode8_avx512(w, out, o0, o1);
  if (w.nibbles && isa == kAvx2) return decode4_avx2(w, out, o0, o1);
#endif
  decode_portable(w, out, o0, o1);
}

int64_t grain_rows(const Weight& w, int64_t n) {
  // ~16K weight-rows of work per task: small layers stay on one thread.
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, w.in_f * n));
}

struct Outliers {
  const int32_t* idx = nullptr;
  const at::Half* val = nullptr;
  int64_t n = 0;
};

Outliers make_outliers(const c10::optional<at::Tensor>& idx,
                       const c10::optional<at::Tensor>& val, int64_t numel) {
  Outliers o;
  TORCH_CHECK(idx.has_value() == val.has_value(), "wclust: outlier idx and val go together");
  if (!idx.has_value()) return o;
  TORCH_CHECK(idx->scalar_type() == at::kInt && val->scalar_type() == at::kHalf &&
                  idx->is_contiguous() && val->is_contiguous() && idx->numel() == val->numel(),
              "wclust: outliers must be contiguous int32 indices and float16 values");
  o.idx = idx->data_ptr<int32_t>();
  o.val = val->data_ptr<at::Half>();
  o.n = idx->numel();
  for (int64_t i = 0; i < o.n; ++i)
    TORCH_CHECK(o.idx[i] >= 0 && o.idx[i] < numel, "wclust: outlier index out of range");
  return o;
}

inline float weight_at(const Weight& w, int64_t o, int64_t j) {
  float v = w.cb[o * w.cb_stride + code_at(w, o, j)];
  if (w.scale) {
    int64_t g = o * w.n_groups + j / w.group;
    v = v * w.scale[g] + (w.offset ? w.offset[g] : 0.f);
  }
  return v;
}

void check_x(const at::Tensor& x, const Weight& w) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat,
              "wclust: x must be a 2-D float32 tensor");
  TORCH_CHECK(x.size(1) == w.in_f, "wclust: x has ", x.size(1), " features, the weight ",
              w.in_f);
}

// Rows [r0, r1) of the dense weight, outliers in place, into dst (row o at
// dst + (o - r0) * in), the rows decoded in parallel.
// The outliers of rows [r0, r1) written over their decoded weights in dst.
void place_outliers(const Weight& w, const Outliers& ol, float* dst, int64_t r0, int64_t r1) {
  for (int64_t i = 0; i < ol.n; ++i) {
    const int64_t o = ol.idx[i] / w.in_f;
    if (o >= r0 && o < r1) dst[(o - r0) * w.in_f + ol.idx[i] % w.in_f] = static_cast<float>(ol.val[i]);
  }
}

void decode_block(const Weight& w, const Outliers& ol, float* dst, int64_t r0, int64_t r1,
                  int isa) {
  at::parallel_for(r0, r1, grain_rows(w, 1), [&](int64_t o0, int64_t o1) {
    run_decode(w, dst + (o0 - r0) * w.in_f, o0, o1, isa);
  });
  place_outliers(w, ol, dst, r0, r1);
}

// A buffer of at least n elements kept by the caller between calls (a thread_local
// vector, named in the calling thread: a worker thread would get its own). It grows
// without copying its old contents and never shrinks: a fresh buffer per call,
// interleaved with the activations, left holes in the heap that grew the process.
template <typename T>
T* kept_buffer(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) {
    v.clear();
    v.shrink_to_fit();
    v.resize(n);
  }
  return v.data();
}

// ---------------------------------------------------------------- operators ---------

at::Tensor lut_linear(const at::Tensor& x_in, const at::Tensor& codes, int64_t code_bits,
                      const at::Tensor& codebook, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& offset,
                      const c10::optional<at::Tensor>& outlier_idx,
                      const c10::optional<at::Tensor>& outlier_val,
                      const c10::optional<at::Tensor>& bias) {
  Weight w = make_weight(codes, code_bits, codebook, scale, offset);
  check_x(x_in, w);
  at::Tensor x = x_in.contiguous();
  Outliers ol = make_outliers(outlier_idx, outlier_val, w.out_f * w.in_f);
  const int64_t n = x.size(0);
  const int isa = active_isa().load(std::memory_order_relaxed);
  const float* xp = x.data_ptr<float>();
  at::Tensor y;
  if (n <= kMaxBatch) {
    // each weight looked up once for all n rows; outliers corrected after
    y = at::empty({n, w.out_f}, x.options());
    float* yp = y.data_ptr<float>();
    if (n > 0)
      at::parallel_for(0, w.out_f, grain_rows(w, n), [&](int64_t o0, int64_t o1) {
        run_rows(w, xp, n, w.in_f, yp, w.out_f, o0, o1, isa);
      });
    for (int64_t i = 0; i < ol.n; ++i) {
      int64_t o = ol.idx[i] / w.in_f, j = ol.idx[i] % w.in_f;
      float d = static_cast<float>(ol.val[i]) - weight_at(w, o, j);
      for (int64_t b = 0; b < n; ++b) yp[b * w.out_f + o] += d * xp[b * w.in_f + j];
    }
    if (bias.has_value()) y.add_(*bias);
    return y;
  }
  // many rows: each thread takes blocks of output rows, decodes its block of the
  // weight into its own kept buffer (at most ~4 MB, and so that every thread gets
  // work) and runs the single-threaded BLAS matmul y[:, block] = x @ W_block.T on it
  // while the block is still in its own cache. y's column block is a strided view the
  // BLAS call writes with its leading dimension (no (out, n) temporary, no transposing
  // copy). Decoding all rows in parallel and then one threaded matmul moved every
  // decoded weight between the cores' caches.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t cap = std::max<int64_t>(16, (int64_t{1} << 20) / std::max<int64_t>(1, w.in_f));
  const int64_t even = (w.out_f + threads - 1) / threads;
  const int64_t block = std::max<int64_t>(1, std::min(cap, ((even + 15) / 16) * 16));
  const int64_t n_blocks = (w.out_f + block - 1) / block;
  y = at::empty({n, w.out_f}, x.options());
  const at::ThreadLocalState caller;  // inference mode and dispatch state, for the workers
  at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard same_state(caller);
    at::AutoDispatchBelowAutograd below_autograd;
    static thread_local std::vector<float> decoded;
    const int64_t rows = std::min(block, w.out_f);
    at::Tensor wbuf =
        at::from_blob(kept_buffer(decoded, rows * w.in_f), {rows, w.in_f}, x.options());
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * block, r1 = std::min(w.out_f, r0 + block);
      at::Tensor wb = wbuf.narrow(0, 0, r1 - r0);
      run_decode(w, wb.data_ptr<float>(), r0, r1, isa);
      place_outliers(w, ol, wb.data_ptr<float>(), r0, r1);
      at::Tensor yb = y.narrow(1, r0, r1 - r0);
      if (bias.has_value())
        at::addmm_out(yb, bias->narrow(0, r0, r1 - r0), x, wb.t());
      else
        at::mm_out(yb, x, wb.t());
    }
  });
  return y;
}

// One row to int8 with its absmax scale (returned): q = round-half-even(v / s).
float quantize_row_portable(const float* v, int64_t len, int8_t* q) {
  float amax = 0.f;
  for (int64_t j = 0; j < len; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
  for (int64_t j = 0; j < len; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
  return s;
}

#ifdef WCLUST_X86
__attribute__((target("avx512f"))) float quantize_row_avx512(const float* v, int64_t len,
                                                            int8_t* q) {
  __m512 m = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= len; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + j)));
  alignas(64) float lanes[16];  // (gcc's _mm512_reduce_max_ps warns of uninitialized use)
  _mm512_store_ps(lanes, m);
  float amax = 0.f;
  for (float v16 : lanes) amax = std::max(amax, v16);
  for (; j < len; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
  const __m512 iv = _mm512_set1_ps(inv);
  for (j = 0; j + 16 <= len; j += 16) {
    // cvtps rounds half to even (the default rounding mode), as nearbyint does
    __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + j), iv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtsepi32_epi8(r));
  }
  for (; j < len; ++j) q[j] = static_cast<int8_t>(std::nearbyint(v[j] * inv));
  return s;
}
#endif

at::Tensor lut_linear_int8(const at::Tensor& x_in, const at::Tensor& codes, int64_t code_bits,
                           const at::Tensor& codebook, const c10::optional<at::Tensor>& scale,
                           const c10::optional<at::Tensor>& offset,
                           const c10::optional<at::Tensor>& outlier_idx,
                           const c10::optional<at::Tensor>& outlier_val,
                           const c10::optional<at::Tensor>& bias) {
  // x @ W.T + bias with int8 arithmetic, for many rows (an encoder's frames): each row
  // of x is quantized to int8 with its own absmax scale, blocks of W are decoded and
  // quantized to int8 with one scale per output row, and the int8 GEMM (VNNI where the
  // CPU has it) sums in int32. No dense copy of W is kept; the buffers are per thread.
  Weight w = make_weight(codes, code_bits, codebook, scale, offset);
  check_x(x_in, w);
  at::Tensor x = x_in.contiguous();
  Outliers ol = make_outliers(outlier_idx, outlier_val, w.out_f * w.in_f);
  const int64_t n = x.size(0), in_f = w.in_f;
  const int isa = active_isa().load(std::memory_order_relaxed);
  const float* xp = x.data_ptr<float>();
  at::Tensor xq = at::empty({n, in_f}, x.options().dtype(at::kChar));
  std::vector<float> sx(n);
  int8_t* xqp = xq.data_ptr<int8_t>();
  auto quantize_row = [isa](const float* v, int64_t len, int8_t* q) {
#ifdef WCLUST_X86
    if (isa == kAvx512) return quantize_row_avx512(v, len, q);
#endif
    return quantize_row_portable(v, len, q);
  };
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, in_f)),
                   [&](int64_t a, int64_t b) {
                     for (int64_t i = a; i < b; ++i)
                       sx[i] = quantize_row(xp + i * in_f, in_f, xqp + i * in_f);
                   });
  // blocks of at most ~1M decoded weights and ~1M int32 sums (4 MB each)
  const int64_t per = std::min((int64_t{1} << 20) / std::max<int64_t>(1, in_f),
                               (int64_t{1} << 20) / std::max<int64_t>(1, n));
  const int64_t block = std::min(w.out_f, std::max<int64_t>(16, per));
  static thread_local std::vector<float> decoded;
  static thread_local std::vector<int8_t> wq;
  static thread_local std::vector<int32_t> acc;
  float* const dp = kept_buffer(decoded, block * in_f);
  int8_t* const wqp = kept_buffer(wq, block * in_f);
  int32_t* const ap = kept_buffer(acc, n * block);
  std::vector<float> sw(block);
  at::Tensor y = at::empty({n, w.out_f}, x.options());
  float* yp = y.data_ptr<float>();
  at::Tensor b_c = bias.has_value() ? bias->contiguous() : at::Tensor();  // held: bp reads it
  const float* bp = b_c.defined() ? b_c.data_ptr<float>() : nullptr;
  for (int64_t r0 = 0; r0 < w.out_f; r0 += block) {
    const int64_t r1 = std::min(w.out_f, r0 + block), rows = r1 - r0;
    decode_block(w, ol, dp, r0, r1, isa);
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, in_f)),
                     [&](int64_t a, int64_t b) {
                       for (int64_t o = a; o < b; ++o)
                         sw[o] = quantize_row(dp + o * in_f, in_f, wqp + o * in_f);
                     });
    at::Tensor wt = at::from_blob(wqp, {rows, in_f}, xq.options());
    at::Tensor ab = at::from_blob(ap, {n, rows}, x.options().dtype(at::kInt));
    at::_int_mm_out(ab, xq, wt.t());
    at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, rows)),
                     [&](int64_t a, int64_t b) {
                       for (int64_t i = a; i < b; ++i) {
                         float* yr = yp + i * w.out_f + r0;
                         const int32_t* ar = ap + i * rows;
                         for (int64_t o = 0; o < rows; ++o)
                           yr[o] = static_cast<float>(ar[o]) * sx[i] * sw[o] +
                                   (bp ? bp[r0 + o] : 0.f);
                       }
                     });
  }
  return y;
}

// ---------------------------------------------------------------- vector codes ------
//
// One code per d consecutive inputs of a row, one codebook (K, d) for the tensor,
// optional scale per group of consecutive inputs of a row (a multiple of d). Codes come
// as rows (out, in / d) uint8 or int16 (read as uint16), or as tiles of 16 rows
// (ceil(out / 16), in / d, 16) uint8 with scales tiled alike (ceil(out / 16), groups,
// 16). For each row of x a table of every centroid's dot product with every d-slice of
// x (in / d x K floats); then rows take one scalar look-up and add per code, tiles one
// permute from the slice's table in registers per 16 codes. A group's sum is scaled
// once. On AVX2, tiles of up to 64 centroids round the tables to int16
// (vq_tiles_int16_avx2): the one path whose result is not the float sum, off by at
// most half a table step per code.

// T[j * K + c] = dot(cb[c], x[j*d : j*d + d]) for slices [j0, j1); cbt: (d, K), K a
// multiple of 16 (zero-padded).
void vq_table_portable(const float* cbt, int64_t K, int64_t d, const float* x, float* T,
                       int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float* t = T + j * K;
    for (int64_t c = 0; c < K; ++c) t[c] = 0.f;
    for (int64_t e = 0; e < d; ++e) {
      const float xv = x[j * d + e];
      const float* row = cbt + e * K;
      for (int64_t c = 0; c < K; ++c) t[c] += row[c] * xv;
    }
  }
}

#ifdef WCLUST_X86
__attribute__((target("avx512f"))) void vq_table_avx512(const float* cbt, int64_t K, int64_t d,
                                                        const float* x, float* T, int64_t j0,
                                                        int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float* t = T + j * K;
    for (int64_t c = 0; c < K; c += 16) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t e = 0; e < d; ++e)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(cbt + e * K + c), _mm512_set1_ps(x[j * d + e]), acc);
      _mm512_storeu_ps(t + c, acc);
    }
  }
}
#endif

template <typename C>
void vq_rows(const C* codes, int64_t n_vec, const float* T, int64_t K, const float* scale,
             int64_t vec_per_group, float* y, int64_t o0, int64_t o1) {
  const int64_t n_groups = n_vec / vec_per_group;
  for (int64_t o = o0; o < o1; ++o) {
    const C* r = codes + o * n_vec;
    float total = 0.f;
    for (int64_t g = 0; g < n_groups; ++g) {
      float a[4] = {0.f, 0.f, 0.f, 0.f};  // independent chains: the loads overlap
      int64_t j = g * vec_per_group;
      const int64_t end = j + vec_per_group;
      for (; j + 4 <= end; j += 4)
        for (int u = 0; u < 4; ++u) a[u] += T[(j + u) * K + r[j + u]];
      for (; j < end; ++j) a[0] += T[j * K + r[j]];
      const float sum = (a[0] + a[1]) + (a[2] + a[3]);
      total += scale ? scale[o * n_groups + g] * sum : sum;
    }
    y[o] = total;
  }
}

#ifdef WCLUST_X86
// Tiled byte codes (n_blocks, n_vec, 16): the 16 rows of a block side by side for each
// slice, so one slice's table (K <= 64: at most 4 registers) serves 16 rows with one
// permute (and a blend above 32 entries) per 16 codes. Scales (n_blocks, n_groups, 16).
template <int P>
__attribute__((target("avx512f"))) void vq_tiles_avx512(const uint8_t* codes, int64_t n_vec,
                                                        const float* T, int64_t Kp,
                                                        const float* scale,
                                                        int64_t vec_per_group, float* y,
                                                        int64_t out_f, int64_t rb0,
                                                        int64_t rb1) {
  const int64_t n_groups = n_vec / vec_per_group;
  ByteTable512<P> bt;
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const uint8_t* cp = codes + rb * n_vec * 16;
    __m512 total = _mm512_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      int64_t j = g * vec_per_group;
      const int64_t end = j + vec_per_group;
      for (; j + 2 <= end; j += 2) {
        bt.load(T + j * Kp);
        a0 = _mm512_add_ps(a0, bt.lookup(codes16(cp + j * 16)));
        bt.load(T + (j + 1) * Kp);
        a1 = _mm512_add_ps(a1, bt.lookup(codes16(cp + (j + 1) * 16)));
      }
      if (j < end) {
        bt.load(T + j * Kp);
        a0 = _mm512_add_ps(a0, bt.lookup(codes16(cp + j * 16)));
      }
      const __m512 sum = _mm512_add_ps(a0, a1);
      total = scale ? _mm512_fmadd_ps(_mm512_loadu_ps(scale + (rb * n_groups + g) * 16), sum, total)
                    : _mm512_add_ps(total, sum);
    }
    const int64_t left = std::min<int64_t>(16, out_f - rb * 16);
    _mm512_mask_storeu_ps(y + rb * 16, static_cast<__mmask16>((1u << left) - 1), total);
  }
}
#endif

#ifdef WCLUST_X86
// Tiles with more than 64 entries: a slice's table takes up to 16 registers, too many to
// load again for every block of 16 rows, so the loop turns around: each slice's table
// is loaded once and serves every row block of the range, whose sums wait in a small
// buffer (16 floats per block, in L1) until the group's scale multiplies them. The
// codes are slice-major here, (in / d, ceil(out / 16), 16), so a slice's blocks lie
// side by side (block-major, the blocks of one slice sat a row of codes apart and
// aliased in the L1 cache).
template <int P>
__attribute__((target("avx512f"))) void vq_tiles_by_slice_avx512(
    const uint8_t* codes, int64_t n_vec, int64_t n_blocks, const float* T, int64_t Kp,
    const float* scale, int64_t vec_per_group, float* y, int64_t out_f, int64_t rb0,
    int64_t rb1) {
  const int64_t n_groups = n_vec / vec_per_group, nb = rb1 - rb0;
  static thread_local std::vector<float> sums;  // per worker thread
  float* gacc = kept_buffer(sums, 2 * nb * 16);
  float* total = gacc + nb * 16;
  std::fill(total, total + nb * 16, 0.f);
  ByteTable512<P> bt;
  for (int64_t g = 0; g < n_groups; ++g) {
    std::fill(gacc, gacc + nb * 16, 0.f);
    for (int64_t j = g * vec_per_group; j < (g + 1) * vec_per_group; ++j) {
      bt.load(T + j * Kp);
      const uint8_t* cp = codes + (j * n_blocks + rb0) * 16;
      for (int64_t b = 0; b < nb; ++b, cp += 16) {
        float* a = gacc + b * 16;
        _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a), bt.lookup(codes16(cp))));
      }
    }
    for (int64_t b = 0; b < nb; ++b) {
      const __m512 sum = _mm512_loadu_ps(gacc + b * 16);
      float* t = total + b * 16;
      _mm512_storeu_ps(t, scale ? _mm512_fmadd_ps(_mm512_loadu_ps(scale + ((rb0 + b) * n_groups + g) * 16),
                                                  sum, _mm512_loadu_ps(t))
                                : _mm512_add_ps(_mm512_loadu_ps(t), sum));
    }
  }
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t left = std::min<int64_t>(16, out_f - (rb0 + b) * 16);
    std::memcpy(y + (rb0 + b) * 16, total + b * 16, left * sizeof(float));
  }
}
#endif

#ifdef WCLUST_X86
// AVX2 forms: 8 lanes, so a block of 16 rows is two registers of sums.

__attribute__((target("avx2,fma"))) void vq_table_avx2(const float* cbt, int64_t K, int64_t d,
                                                      const float* x, float* T, int64_t j0,
                                                      int64_t j1) {
  for (int64_t j = j0; j < j1; ++j) {
    float* t = T + j * K;
    for (int64_t c = 0; c < K; c += 8) {
      __m256 acc = _mm256_setzero_ps();
      for (int64_t e = 0; e < d; ++e)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(cbt + e * K + c), _mm256_set1_ps(x[j * d + e]), acc);
      _mm256_storeu_ps(t + c, acc);
    }
  }
}

__attribute__((target("avx2,fma"))) inline void store_block(float* y, int64_t rb, int64_t out_f,
                                                           __m256 lo, __m256 hi) {
  const int64_t left = std::min<int64_t>(16, out_f - rb * 16);
  if (left == 16) {
    _mm256_storeu_ps(y + rb * 16, lo);
    _mm256_storeu_ps(y + rb * 16 + 8, hi);
    return;
  }
  alignas(32) float buf[16];
  _mm256_store_ps(buf, lo);
  _mm256_store_ps(buf + 8, hi);
  std::memcpy(y + rb * 16, buf, left * sizeof(float));
}

#endif

// Tiles of up to 64 centroids on AVX2. Float tables in registers take 8-lane permutes:
// 2 and a blend per 8 codes at 16 entries, 15 at 64 (slower than scalar look-ups).
// So the tables are rounded to int16 and looked up a byte at a time by vpshufb, 32
// codes (two blocks of 16 rows) per shuffle: per slice up to 4 sub-tables of 16
// entries x (low, high byte), selected by code bits 4 and 5 (2-3x faster than the
// float permutes at 16-32 entries on AMD Zen 3; T-MAC looks up int8 tables the same
// way). A chunk of c slices (the largest divisor of a scale group up to kQChunk)
// shares one table scale, max|T| / (32767 / c), so its c int16 sums cannot overflow;
// the sum of a chunk is then scaled in float. Each entry is off by at most half a
// step, 1/8190 of the chunk's largest entry at c = 8: on random inputs the outputs are
// off by about 3e-4 of their norm, near the 2e-4 that rounding x to float16 makes and
// a sixth of bfloat16's 1.8e-3 (chunks of 16 ran 5% faster at twice the error).
// Tq per slice: Kp (32 or 64) low bytes, then Kp high bytes.
constexpr int64_t kQChunk = 8;

#ifdef WCLUST_X86
// The int16 tables of chunks [c0, c1) straight from x (cbt: (d, Kp), Kp 32 or 64, as
// vq_table_avx2).
__attribute__((target("avx2,fma"))) void vq_table_int16(const float* cbt, int64_t Kp, int64_t d,
                                                       const float* x, int64_t chunk,
                                                       uint8_t* Tq, float* tscale, int64_t c0,
                                                       int64_t c1) {
  alignas(32) float t[kQChunk * 64];
  const float qmax = static_cast<float>(32767 / chunk);
  const __m256 sign = _mm256_set1_ps(-0.f);
  // per 128-bit lane: the low bytes of 8 int16 entries, then their high bytes
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t c = c0; c < c1; ++c) {
    vq_table_avx2(cbt, Kp, d, x + c * chunk * d, t, 0, chunk);
    __m256 mv = _mm256_setzero_ps();
    for (int64_t i = 0; i < chunk * Kp; i += 8)
      mv = _mm256_max_ps(mv, _mm256_andnot_ps(sign, _mm256_load_ps(t + i)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1)));
    const float s = m > 0.f ? m / qmax : 1.f;
    tscale[c] = s;
    const __m256 inv = _mm256_set1_ps(1.f / s);
    for (int64_t j = 0; j < chunk; ++j) {
      const float* r = t + j * Kp;
      uint8_t* q = Tq + (c * chunk + j) * 2 * Kp;
      for (int64_t i = 0; i < Kp / 16; ++i) {  // sub-table i: entries 16i .. 16i + 15
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + 16 * i), inv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(r + 16 * i + 8), inv));
        const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);  // in order
        const __m256i by = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(w, split), 0xD8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16 * i), _mm256_castsi256_si128(by));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + Kp + 16 * i),
                         _mm256_extracti128_si256(by, 1));
      }
    }
  }
}

// 32 byte codes -> the bytes of the entries at t (up to 4 sub-tables of 16): bits 0-3
// pick within a sub-table (vpshufb), bits 4 and 5 pick the sub-table (each moved to a
// byte's top bit for vpblendvb). Codes below 64 never have bit 7 set (which zeroes).
__attribute__((target("avx2,fma"), always_inline)) inline __m256i sub16_256(const uint8_t* t,
                                                                           __m256i idx) {
  return _mm256_shuffle_epi8(
      _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t))), idx);
}

template <int S>  // sub-tables: 1, 2 or 4
__attribute__((target("avx2,fma"), always_inline)) inline __m256i table_bytes_256(
    const uint8_t* t, __m256i idx, __m256i m4, __m256i m5) {
  if constexpr (S == 1) return sub16_256(t, idx);
  const __m256i lo = _mm256_blendv_epi8(sub16_256(t, idx), sub16_256(t + 16, idx), m4);
  if constexpr (S == 2) return lo;
  return _mm256_blendv_epi8(
      lo, _mm256_blendv_epi8(sub16_256(t + 32, idx), sub16_256(t + 48, idx), m4), m5);
}

// Two blocks of 16 rows (rb, rb + 1) per pass; block-major tiles as vq_tiles_avx512. The
// first S sub-tables of 16 entries of each slice's Kp (vq_table_int16's layout).
template <int S>
__attribute__((target("avx2,fma"))) void vq_tiles_int16_avx2(
    const uint8_t* codes, int64_t n_vec, int64_t n_blocks, const uint8_t* Tq, int64_t Kp,
    const float* tscale, int64_t chunk, const float* scale, int64_t vec_per_group, float* y,
    int64_t out_f, int64_t p0, int64_t p1) {
  const int64_t n_groups = n_vec / vec_per_group;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t rb = 2 * p;
    const bool two = rb + 1 < n_blocks;
    const uint8_t* c0 = codes + rb * n_vec * 16;
    const uint8_t* c1 = two ? c0 + n_vec * 16 : c0;
    __m256 tot[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps()};
    for (int64_t g = 0; g < n_groups; ++g) {
      __m256 gs[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps()};
      for (int64_t j0 = g * vec_per_group; j0 < (g + 1) * vec_per_group; j0 += chunk) {
        __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
        for (int64_t j = j0; j < j0 + chunk; ++j) {
          const __m256i idx = _mm256_inserti128_si256(
              _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(c0 + j * 16))),
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(c1 + j * 16)), 1);
          const __m256i m4 = _mm256_slli_epi16(idx, 3), m5 = _mm256_slli_epi16(idx, 2);
          const uint8_t* t = Tq + j * 2 * Kp;
          const __m256i lb = table_bytes_256<S>(t, idx, m4, m5);
          const __m256i hb = table_bytes_256<S>(t + Kp, idx, m4, m5);
          // per 128-bit lane: rows 0-7 of the lane's block, then rows 8-15
          lo = _mm256_add_epi16(lo, _mm256_unpacklo_epi8(lb, hb));
          hi = _mm256_add_epi16(hi, _mm256_unpackhi_epi8(lb, hb));
        }
        const __m256 ts = _mm256_set1_ps(tscale[j0 / chunk]);
        const __m128i part[4] = {_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi),
                                 _mm256_extracti128_si256(lo, 1), _mm256_extracti128_si256(hi, 1)};
        for (int i = 0; i < 4; ++i)
          gs[i] = _mm256_fmadd_ps(ts, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(part[i])), gs[i]);
      }
      for (int i = 0; i < 4; ++i) {
        if (!scale) {
          tot[i] = _mm256_add_ps(tot[i], gs[i]);
          continue;
        }
        const float* s = scale + ((rb + (i >> 1)) * n_groups + g) * 16 + 8 * (i & 1);
        tot[i] = _mm256_fmadd_ps(_mm256_loadu_ps(two || i < 2 ? s : scale), gs[i], tot[i]);
      }
    }
    store_block(y, rb, out_f, tot[0], tot[1]);
    if (two) store_block(y, rb + 1, out_f, tot[2], tot[3]);
  }
}
#endif

// The portable form of vq_tiles_avx512.
void vq_tiles_portable(const uint8_t* codes, int64_t n_vec, int64_t n_blocks,
                       bool slice_major, const float* T, int64_t Kp, const float* scale,
                       int64_t vec_per_group, float* y, int64_t out_f, int64_t rb0,
                       int64_t rb1) {
  const int64_t n_groups = n_vec / vec_per_group;
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    float total[16] = {0.f};
    for (int64_t g = 0; g < n_groups; ++g) {
      float sum[16] = {0.f};
      for (int64_t j = g * vec_per_group; j < (g + 1) * vec_per_group; ++j) {
        const uint8_t* cp = codes + (slice_major ? j * n_blocks + rb : rb * n_vec + j) * 16;
        for (int r = 0; r < 16; ++r) sum[r] += T[j * Kp + cp[r]];
      }
      for (int r = 0; r < 16; ++r)
        total[r] += scale ? scale[(rb * n_groups + g) * 16 + r] * sum[r] : sum[r];
    }
    for (int64_t r = 0; r < std::min<int64_t>(16, out_f - rb * 16); ++r) y[rb * 16 + r] = total[r];
  }
}

at::Tensor vq_linear(const at::Tensor& x_in, const at::Tensor& codes, const at::Tensor& codebook,
                     const c10::optional<at::Tensor>& scale, const c10::optional<at::Tensor>& bias,
                     int64_t out_features) {
  const bool tiled = codes.dim() == 3;
  TORCH_CHECK(codes.is_contiguous() &&
                  ((tiled && codes.scalar_type() == at::kByte && codes.size(2) == 16) ||
                   (codes.dim() == 2 &&
                    (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kShort))),
              "wclust: vector codes must be contiguous (out, in / d) uint8 or int16, or "
              "uint8 tiles of 16 rows (vq_tiles)");
  TORCH_CHECK(codebook.dim() == 2 && codebook.scalar_type() == at::kFloat,
              "wclust: the vector codebook must be a 2-D float32 tensor (K, d)");
  const int64_t K = codebook.size(0), d = codebook.size(1);
  const int64_t out_f = out_features, n_blocks = (out_f + 15) / 16;
  // tiles: (blocks, in / d, 16) up to 64 entries, slice-major (in / d, blocks, 16) above
  const bool slice_major = tiled && K > 64;
  const int64_t n_vec = slice_major ? codes.size(0) : codes.size(1);
  TORCH_CHECK(out_f >= 0 && (!tiled || codes.size(slice_major ? 1 : 0) == n_blocks) &&
                  (tiled || codes.size(0) == out_f),
              "wclust: codes do not hold ", out_f, " rows");
  const int64_t in_f = n_vec * d;
  TORCH_CHECK(K >= 1 && d >= 1, "wclust: empty vector codebook");
  TORCH_CHECK(K <= (codes.scalar_type() == at::kByte ? 256 : 65536),
              "wclust: too many codebook entries for the code type");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.size(1) == in_f,
              "wclust: x must be (n, ", in_f, ") float32");
  int64_t vec_per_group = n_vec;
  const float* sp = nullptr;
  at::Tensor s_c;
  if (scale.has_value()) {
    s_c = scale->contiguous();
    const int64_t rows = tiled ? n_blocks * 16 : out_f;
    TORCH_CHECK(s_c.scalar_type() == at::kFloat && rows > 0 && s_c.numel() % rows == 0 &&
                    s_c.numel() >= rows && n_vec % (s_c.numel() / rows) == 0,
                "wclust: vector scales must be float32 groups of whole codes within rows "
                "(tiled codes: tiled scales)");
    vec_per_group = n_vec / (s_c.numel() / rows);
    sp = s_c.data_ptr<float>();
  }
  if (bias.has_value())
    TORCH_CHECK(bias->numel() == out_f, "wclust: bias must have out_features elements");
  at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0);
  // the codebook transposed to (d, Kp), Kp a multiple of 32, zero-padded: the table of
  // a slice is then d FMAs per 16 entries, and whole register pairs for the tiles
  const int64_t Kp = (K + 31) / 32 * 32;
  std::vector<float> cbt(d * Kp, 0.f);
  const at::Tensor cb = codebook.contiguous();
  const float* cbp = cb.data_ptr<float>();
  for (int64_t c = 0; c < K; ++c)
    for (int64_t e = 0; e < d; ++e) cbt[e * Kp + c] = cbp[c * d + e];
  const int isa = active_isa().load(std::memory_order_relaxed);
  // AVX2 tiles of up to 64 centroids: int16 tables looked up by byte shuffles
  // (vq_tiles_int16_avx2), one table scale per chunk of slices, the largest divisor of a
  // scale group up to kQChunk; 1, 2 or 4 sub-tables of 16 entries
  const bool int16_tables = tiled && isa == kAvx2 && K <= 64;
  const int S = K <= 16 ? 1 : K <= 32 ? 2 : 4;
  // the largest code the type holds stays inside the buffer (a code past K reads
  // another slice's entry: wrong, never out of bounds; the Python side checks codes)
  static thread_local std::vector<float> table;
  const int64_t max_code = codes.scalar_type() == at::kByte ? 255 : 65535;
  float* T = int16_tables ? nullptr : kept_buffer(table, n_vec * Kp + max_code + 1);
  if (T) std::fill(T + n_vec * Kp, T + n_vec * Kp + max_code + 1, 0.f);
  int64_t chunk = kQChunk;
  while (vec_per_group % chunk) --chunk;
  static thread_local std::vector<uint8_t> qtable;
  static thread_local std::vector<float> qscale;
  uint8_t* Tq = int16_tables ? kept_buffer(qtable, n_vec * 2 * Kp) : nullptr;
  float* tscale = int16_tables ? kept_buffer(qscale, n_vec / chunk) : nullptr;
  at::Tensor y = at::empty({n, out_f}, x.options());
  for (int64_t b = 0; b < n; ++b) {
    const float* xb = x.data_ptr<float>() + b * in_f;
    if (!int16_tables)
      at::parallel_for(0, n_vec, std::max<int64_t>(1, 4096 / Kp), [&](int64_t j0, int64_t j1) {
#ifdef WCLUST_X86
      if (isa == kAvx512) return vq_table_avx512(cbt.data(), Kp, d, xb, T, j0, j1);
      if (isa == kAvx2) return vq_table_avx2(cbt.data(), Kp, d, xb, T, j0, j1);
#endif
      vq_table_portable(cbt.data(), Kp, d, xb, T, j0, j1);
    });
    float* yb = y.data_ptr<float>() + b * out_f;
    if (int16_tables) {
#ifdef WCLUST_X86
      at::parallel_for(0, n_vec / chunk, std::max<int64_t>(1, 256 / chunk), [&](int64_t c0, int64_t c1) {
        vq_table_int16(cbt.data(), Kp, d, xb, chunk, Tq, tscale, c0, c1);
      });
      const uint8_t* cp = codes.data_ptr<uint8_t>();
      at::parallel_for(0, (n_blocks + 1) / 2, std::max<int64_t>(1, 512 / std::max<int64_t>(1, n_vec)),
                       [&](int64_t p0, int64_t p1) {
                         const auto f = S == 1   ? vq_tiles_int16_avx2<1>
                                        : S == 2 ? vq_tiles_int16_avx2<2>
                                                 : vq_tiles_int16_avx2<4>;
                         f(cp, n_vec, n_blocks, Tq, Kp, tscale, chunk, sp, vec_per_group, yb,
                           out_f, p0, p1);
                       });
#endif
    } else if (tiled) {
      const uint8_t* cp = codes.data_ptr<uint8_t>();
      at::parallel_for(0, n_blocks, std::max<int64_t>(1, 1024 / std::max<int64_t>(1, n_vec)),
                       [&](int64_t r0, int64_t r1) {
#ifdef WCLUST_X86
                         if (isa == kAvx512 && K <= 32)
                           return vq_tiles_avx512<1>(cp, n_vec, T, Kp, sp, vec_per_group, yb,
                                                     out_f, r0, r1);
                         if (isa == kAvx512 && K <= 64)
                           return vq_tiles_avx512<2>(cp, n_vec, T, Kp, sp, vec_per_group, yb,
                                                     out_f, r0, r1);
                         if (isa == kAvx512 && K <= 128)
                           return vq_tiles_by_slice_avx512<4>(cp, n_vec, n_blocks, T, Kp, sp,
                                                              vec_per_group, yb, out_f, r0, r1);
                         if (isa == kAvx512)
                           return vq_tiles_by_slice_avx512<8>(cp, n_vec, n_blocks, T, Kp, sp,
                                                              vec_per_group, yb, out_f, r0, r1);
#endif
                         vq_tiles_portable(cp, n_vec, n_blocks, K > 64, T, Kp, sp,
                                           vec_per_group, yb, out_f, r0, r1);
                       });
    } else {
      at::parallel_for(0, out_f, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, n_vec)),
                       [&](int64_t o0, int64_t o1) {
                         if (codes.scalar_type() == at::kByte)
                           vq_rows(codes.data_ptr<uint8_t>(), n_vec, T, Kp, sp, vec_per_group,
                                   yb, o0, o1);
                         else
                           vq_rows(reinterpret_cast<const uint16_t*>(codes.data_ptr<int16_t>()),
                                   n_vec, T, Kp, sp, vec_per_group, yb, o0, o1);
                       });
    }
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// A float32 (rows, cols) tensor for a whole decoded weight. From 4 MB up it is
// 2 MB-aligned and asks the kernel for transparent huge pages, as numpy does for
// its arrays: writing a fresh 100 MB output otherwise costs one page fault per 4 KB,
// more than the decode itself.
at::Tensor dense_output(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
#ifdef __linux__
  const size_t bytes = static_cast<size_t>(rows * cols) * sizeof(float);
  constexpr size_t kHuge = size_t{2} << 20;
  void* p = nullptr;
  if (bytes >= (size_t{4} << 20) && posix_memalign(&p, kHuge, bytes) == 0) {
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint: ignored where huge pages are off
    return at::from_blob(p, {rows, cols}, [](void* q) { std::free(q); }, opts);
  }
#endif
  return at::empty({rows, cols}, opts);
}

at::Tensor lut_decode(const at::Tensor& codes, int64_t code_bits, const at::Tensor& codebook,
                      const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& offset,
                      const c10::optional<at::Tensor>& outlier_idx,
                      const c10::optional<at::Tensor>& outlier_val) {
  Weight w = make_weight(codes, code_bits, codebook, scale, offset);
  Outliers ol = make_outliers(outlier_idx, outlier_val, w.out_f * w.in_f);
  const int isa = active_isa().load(std::memory_order_relaxed);
  at::Tensor out = dense_output(w.out_f, w.in_f, codebook.options());
  decode_block(w, ol, out.data_ptr<float>(), 0, w.out_f, isa);
  return out;
}

at::Tensor lut_rows(const at::Tensor& codes, int64_t code_bits, const at::Tensor& codebook,
                    const c10::optional<at::Tensor>& scale,
                    const c10::optional<at::Tensor>& offset, const at::Tensor& idx_in) {
  Weight w = make_weight(codes, code_bits, codebook, scale, offset);
  at::Tensor idx = idx_in.to(at::kLong).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t m = idx.numel();
  for (int64_t i = 0; i < m; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < w.out_f, "wclust: row index ", ip[i],
                " out of range for ", w.out_f, " rows");
  const int isa = active_isa().load(std::memory_order_relaxed);
  at::Tensor out = at::empty({m, w.in_f}, codebook.options());
  float* p = out.data_ptr<float>();
  at::parallel_for(0, m, grain_rows(w, 1), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) run_decode(w, p + i * w.in_f, ip[i], ip[i] + 1, isa);
  });
  return out;
}

at::Tensor kernel_layout(const at::Tensor& packed, int64_t bits, int64_t rows, int64_t cols) {
  // The canonical bit stream (code i at bits [i*b, (i+1)*b), little-endian) of a
  // (rows, cols) weight -> the layout the kernels read: codes of 1-3 bits as 4-bit
  // pairs (rows, cols / 2), 5-7 bits one per byte (rows, cols). One pass, no
  // temporaries (unpacking with torch ops made int64 copies of every chunk).
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "wclust: packed codes must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(bits >= 1 && bits <= 8 && bits != 4 && bits != 8,
              "wclust: kernel_layout converts codes of 1-3 or 5-7 bits");
  TORCH_CHECK(rows >= 0 && cols >= 0 && (bits > 4 || cols % 2 == 0),
              "wclust: codes of up to 3 bits need an even row length");
  const int64_t n = rows * cols;
  TORCH_CHECK(packed.numel() == (n * bits + 7) / 8, "wclust: ", n, " codes of ", bits,
              " bits need ", (n * bits + 7) / 8, " bytes, got ", packed.numel());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const uint32_t mask = (1u << bits) - 1;
  auto code = [&](int64_t i) -> uint8_t {
    const int64_t bit = i * bits, byte = bit >> 3;
    uint32_t v = p[byte];
    if (byte + 1 < packed.numel()) v |= static_cast<uint32_t>(p[byte + 1]) << 8;
    return static_cast<uint8_t>((v >> (bit & 7)) & mask);
  };
  at::Tensor out;
  if (bits < 4) {
    out = at::empty({rows, cols / 2}, packed.options());
    uint8_t* q = out.data_ptr<uint8_t>();
    at::parallel_for(0, n / 2, 1 << 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) q[i] = code(2 * i) | (code(2 * i + 1) << 4);
    });
  } else {
    out = at::empty({rows, cols}, packed.options());
    uint8_t* q = out.data_ptr<uint8_t>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) q[i] = code(i);
    });
  }
  return out;
}

std::string isa(const std::string& cap) {
  // "" reads the active instruction set; a name caps it (never above the CPU's)
  if (cap == "portable") active_isa() = kPortable;
  else if (cap == "avx2") active_isa() = std::min(best_isa(), static_cast<int>(kAvx2));
  else if (cap == "avx512" || cap == "best") active_isa() = best_isa();
  else TORCH_CHECK(cap.empty(), "wclust: isa must be portable, avx2, avx512 or best");
  return isa_name(active_isa().load());
}

}  // namespace

TORCH_LIBRARY(wclust, m) {
  m.def(
      "lut_linear(Tensor x, Tensor codes, int code_bits, Tensor codebook, Tensor? scale, "
      "Tensor? offset, Tensor? outlier_idx, Tensor? outlier_val, Tensor? bias) -> Tensor");
  m.def(
      "lut_decode(Tensor codes, int code_bits, Tensor codebook, Tensor? scale, Tensor? offset, "
      "Tensor? outlier_idx, Tensor? outlier_val) -> Tensor");
  m.def(
      "lut_rows(Tensor codes, int code_bits, Tensor codebook, Tensor? scale, Tensor? offset, "
      "Tensor idx) -> Tensor");
  m.def(
      "lut_linear_int8(Tensor x, Tensor codes, int code_bits, Tensor codebook, Tensor? scale, "
      "Tensor? offset, Tensor? outlier_idx, Tensor? outlier_val, Tensor? bias) -> Tensor");
  m.def("kernel_layout(Tensor packed, int bits, int rows, int cols) -> Tensor");
  m.def(
      "vq_linear(Tensor x, Tensor codes, Tensor codebook, Tensor? scale, Tensor? bias, "
      "int out_features) -> Tensor");
  m.def("isa(str cap) -> str", &isa);
}

TORCH_LIBRARY_IMPL(wclust, CPU, m) {
  m.impl("lut_linear", &lut_linear);
  m.impl("lut_decode", &lut_decode);
  m.impl("lut_rows", &lut_rows);
  m.impl("kernel_layout", &kernel_layout);
  m.impl("lut_linear_int8", &lut_linear_int8);
  m.impl("vq_linear", &vq_linear);
}

}  // namespace wclust

// A Python module only so that `import wclust._C` loads the library (and so the ops).
static struct PyModuleDef wclust_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&wclust_c_module); }
