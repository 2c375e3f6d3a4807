// Fused CPU kernels for training: dropout in one pass over memory.
//
// PyTorch's CPU dropout draws a bernoulli per element from mt19937 and then multiplies
// by a float mask in separate passes; for the small ViT that costs more than its matrix
// products. Here the random bits come from a counter-based hash (splitmix64's finaliser
// of seed + golden * word index), so any thread can produce any block of the mask without
// shared state, and one 64-bit hash yields four 16-bit uniforms (p exact to 1/65536).
// The keep mask is stored as bits (32 elements per int32), so the backward pass reads
// 1/16 of what a bf16 mask would cost.
//
// The bits are exactly those of `keep_mask_reference` in native.py (a test checks it),
// so runs with and without this extension draw the same masks from the same seed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#include <immintrin.h>
#define VITCNN_AVX512 1
#endif

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;
constexpr int64_t kBlock = 32;  // elements per mask word

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Keep bits of elements 32*block .. 32*block+31: element i keeps when the 16-bit slice
// i % 4 of hash word i / 4 is >= threshold (unsigned), i.e. with probability 1 - p.
inline uint32_t keep_bits(uint64_t seed, int64_t block, uint32_t threshold) {
#ifdef VITCNN_AVX512
  const __m512i word = _mm512_add_epi64(_mm512_set1_epi64(block * 8), _mm512_set_epi64(8, 7, 6, 5, 4, 3, 2, 1));
  __m512i z = _mm512_add_epi64(_mm512_set1_epi64((int64_t)seed), _mm512_mullo_epi64(word, _mm512_set1_epi64((int64_t)kGolden)));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 30)), _mm512_set1_epi64((int64_t)0xbf58476d1ce4e5b9ULL));
  z = _mm512_mullo_epi64(_mm512_xor_si512(z, _mm512_srli_epi64(z, 27)), _mm512_set1_epi64((int64_t)0x94d049bb133111ebULL));
  z = _mm512_xor_si512(z, _mm512_srli_epi64(z, 31));
  return _mm512_cmpge_epu16_mask(z, _mm512_set1_epi16((short)threshold));
#else
  uint32_t bits = 0;
  for (int w = 0; w < 8; ++w) {
    const uint64_t r = mix64(seed + kGolden * (uint64_t)(block * 8 + w + 1));
    for (int j = 0; j < 4; ++j) bits |= (uint32_t)((uint16_t)(r >> (16 * j)) >= threshold) << (4 * w + j);
  }
  return bits;
#endif
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as PyTorch does
  if (std::isnan(f)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// out[i] = keep_i ? in[i] * scale : 0 for the n (<= 32) elements of one block.
inline void scale_kept(const uint16_t* in, uint16_t* out, uint32_t bits, int n, float scale) {
#if defined(VITCNN_AVX512) && defined(__AVX512BF16__)
  const __mmask32 valid = n == 32 ? 0xffffffffu : (1u << n) - 1;
  const __m512i v = _mm512_maskz_loadu_epi16(valid, in);
  const __m512 s = _mm512_set1_ps(scale);
  const __m512 lo = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16)), s);
  const __m512 hi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16)), s);
  const __m512i r = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
  _mm512_mask_storeu_epi16(out, valid, _mm512_maskz_mov_epi16(bits, r));
#else
  for (int i = 0; i < n; ++i) out[i] = (bits >> i) & 1u ? float_to_bf16(bf16_to_float(in[i]) * scale) : 0;
#endif
}

inline void scale_kept(const float* in, float* out, uint32_t bits, int n, float scale) {
#ifdef VITCNN_AVX512
  const __m512 s = _mm512_set1_ps(scale);
  for (int half = 0; half < 2 && 16 * half < n; ++half) {
    const int m = n - 16 * half < 16 ? n - 16 * half : 16;
    const __mmask16 valid = m == 16 ? 0xffff : (__mmask16)((1u << m) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, in + 16 * half);
    _mm512_mask_storeu_ps(out + 16 * half, valid, _mm512_maskz_mul_ps((__mmask16)(bits >> (16 * half)), v, s));
  }
#else
  for (int i = 0; i < n; ++i) out[i] = (bits >> i) & 1u ? in[i] * scale : 0.0f;
#endif
}

// Either draws the mask (bits_in == nullptr; stored to bits_out) or reuses a stored one.
template <typename T>
void masked_scale(const T* in, T* out, const uint32_t* bits_in, uint32_t* bits_out, int64_t n, uint64_t seed,
                  uint32_t threshold, float scale) {
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t bits = bits_in ? bits_in[b] : keep_bits(seed, b, threshold);
      if (bits_out) bits_out[b] = bits;
      const int m = (int)std::min<int64_t>(kBlock, n - kBlock * b);
      scale_kept(in + kBlock * b, out + kBlock * b, bits, m, scale);
    }
  });
}

void dispatch(const at::Tensor& in, const at::Tensor& out, const uint32_t* bits_in, uint32_t* bits_out, uint64_t seed,
              uint32_t threshold, double scale) {
  const int64_t n = in.numel();
  if (in.scalar_type() == at::kBFloat16) {
    masked_scale((const uint16_t*)in.data_ptr(), (uint16_t*)out.data_ptr(), bits_in, bits_out, n, seed, threshold,
                 (float)scale);
  } else {
    masked_scale(in.const_data_ptr<float>(), out.data_ptr<float>(), bits_in, bits_out, n, seed, threshold,
                 (float)scale);
  }
}

void check_input(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16");
}

// (y, keep bits): y = x * keep / (1 - p), keep drawn with P(keep) = 1 - threshold / 65536.
std::tuple<at::Tensor, at::Tensor> dropout(const at::Tensor& x, int64_t seed, int64_t threshold, double scale) {
  check_input(x, "dropout input");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "dropout threshold must be in [0, 65536)");
  const at::Tensor in = x.contiguous();
  at::Tensor y = at::empty_like(in, at::MemoryFormat::Contiguous);
  at::Tensor bits = at::empty({(in.numel() + kBlock - 1) / kBlock}, in.options().dtype(at::kInt));
  dispatch(in, y, nullptr, (uint32_t*)bits.data_ptr(), (uint64_t)seed, (uint32_t)threshold, scale);
  return {y, bits};
}

// The gradient through the same mask and scale.
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& bits, double scale) {
  check_input(grad, "dropout gradient");
  TORCH_CHECK(bits.scalar_type() == at::kInt && bits.numel() == (grad.numel() + kBlock - 1) / kBlock,
              "dropout mask does not match the gradient");
  const at::Tensor in = grad.contiguous();
  at::Tensor out = at::empty_like(in, at::MemoryFormat::Contiguous);
  dispatch(in, out, (const uint32_t*)bits.contiguous().data_ptr(), nullptr, 0, 0, scale);
  return out;
}

}  // namespace

TORCH_LIBRARY(vitcnn, m) {
  m.def("dropout(Tensor x, int seed, int threshold, float scale) -> (Tensor, Tensor)");
  m.def("dropout_backward(Tensor grad, Tensor bits, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(vitcnn, CPU, m) {
  m.impl("dropout", dropout);
  m.impl("dropout_backward", dropout_backward);
}
