// relay-llm's CPU kernels on raw pointers (AVX2 + FMA), shared by the torch ops (gemv.cpp) and the fused
// decode layer (layer.cpp). Everything is fp32; shapes are in each function's comment.
//
// GEMV: y[b, n] = sum_k x[b, k] w[n, k] (+ bias[n]) for a few activation rows b, weights either fp32 [N, K]
// or on an int8 grid: w[n, k] = scale[n, g] * q[n, k] + offset[n, g], g = k / G, with q packed in blocks of 4
// rows (rows past N zero): q[n / 4, k / 8, n % 4, k % 8], so that a block's 4 rows stream from one run of
// memory, 8 weights of each row at a time (`kernels.pack`). The grid product is
// y[b, n] = sum_g scale[n, g] * (sum_{k in g} x[b, k] q[n, k]) + offset[n, g] * (sum_{k in g} x[b, k]),
// all in fp32: the product with the dequantised weight, up to summation order. G is a multiple of 8.
// Rows of w are split across torch's intra-op (OpenMP) threads; a thread accumulates R weight rows x T
// activation rows at once, so each weight is read from memory once per call. The int8 stream is prefetched
// a line at a time, kPrefetchBytes ahead: the widening work otherwise leaves too few loads in flight to
// stream from DRAM (LM head, 2 Zen 2 cores: 12.9 -> 10.9-12.2 ms; 4 and 16 KB measured alike, within noise;
// prefetching whole blocks at once was slower).
#pragma once

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace relay_llm {

constexpr int64_t kBlock = 4;          // weight rows per parallel work item
constexpr int64_t kPrefetchBytes = 8192;  // the int8 stream is prefetched this far ahead, a line at a time

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

struct Args {
  const float* x;     // [B, K]
  const float* bias;  // [N] or nullptr
  float* y;           // [B, N]
  int64_t B, K, N;
};

struct F32Weights {
  const float* w;  // [N, K]
};

struct GridWeights {
  const int8_t* q;       // [ceil(N/4), K/8, 4, 8]
  const float* scale;    // [N, groups]
  const float* offset;   // [N, groups] or nullptr
  const float* xsum;     // [B, groups]: sums of x over each group (used with offsets)
  int64_t groups, G;
};

inline void store(const Args& a, int64_t n, int64_t b, __m256 acc) {
  if (n < a.N) a.y[b * a.N + n] = hsum(acc) + (a.bias ? a.bias[n] : 0.0f);
}

// y[b0 .. b0+T, n0 .. n0+R) from fp32 weights.
template <int R, int T>
inline void tile(const F32Weights& w, const Args& a, int64_t n0, int64_t b0) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < a.K; k += 8) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(a.x + (b0 + t) * a.K + k);
    for (int r = 0; r < R; ++r) {
      __m256 wv = _mm256_loadu_ps(w.w + (n0 + r) * a.K + k);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) store(a, n0 + r, b0 + t, acc[r][t]);
}

// y[b0 .. b0+T, n0 .. n0+R) from grid weights: per group, sum x * q, then scale (and add offset * sum x).
// C: 8-weight chunks per group, fixed at compile time for the common group sizes (0: w.G / 8, at run time).
template <int R, int T, int C>
inline void grid_tile(const GridWeights& w, const Args& a, int64_t n0, int64_t b0) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t chunks = C ? C : w.G / 8;
  const float* x = a.x + b0 * a.K;
  const int8_t* q = w.q + (n0 / kBlock) * kBlock * a.K + (n0 % kBlock) * 8;
  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 part[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) part[r][t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t k = (g * chunks + c) * 8;
      if (c & 1) _mm_prefetch(reinterpret_cast<const char*>(q + k * kBlock) + kPrefetchBytes, _MM_HINT_T0);
      __m256 xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * a.K + k);
      for (int r = 0; r < R; ++r) {
        __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k * kBlock + r * 8));
        __m256 qv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
        for (int t = 0; t < T; ++t) part[r][t] = _mm256_fmadd_ps(qv, xv[t], part[r][t]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (n0 + r >= a.N) break;
      int64_t at = (n0 + r) * w.groups + g;
      __m256 s = _mm256_broadcast_ss(w.scale + at);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(part[r][t], s, acc[r][t]);
      if (w.offset) {  // offset * sum_k x: added once, in lane 0
        float o = w.offset[at];
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm256_add_ps(acc[r][t], _mm256_set_ps(0, 0, 0, 0, 0, 0, 0, o * w.xsum[(b0 + t) * w.groups + g]));
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) store(a, n0 + r, b0 + t, acc[r][t]);
}

template <int R, int T>
inline void tile(const GridWeights& w, const Args& a, int64_t n0, int64_t b0) {
  if (w.G == 32) return grid_tile<R, T, 4>(w, a, n0, b0);
  if (w.G == 16) return grid_tile<R, T, 2>(w, a, n0, b0);
  grid_tile<R, T, 0>(w, a, n0, b0);
}

// Register budget (16 ymm): fp32 tiles hold R x T accumulators; grid tiles twice that (partial sums).
template <class W> struct Shape;
template <> struct Shape<F32Weights> { static constexpr int R2 = 4, R4 = 2; };
template <> struct Shape<GridWeights> { static constexpr int R2 = 2, R4 = 1; };

// Weight rows [n0, n0 + R) against every activation row: activation rows 4, 2, then 1 at a time.
template <int R, class W>
inline void block(const W& w, const Args& a, int64_t n0) {
  constexpr int R4 = R < Shape<W>::R4 ? R : Shape<W>::R4, R2 = R < Shape<W>::R2 ? R : Shape<W>::R2;
  int64_t b = 0;
  for (; b + 4 <= a.B; b += 4)
    for (int r = 0; r < R; r += R4) tile<R4, 4>(w, a, n0 + r, b);
  for (; b + 2 <= a.B; b += 2)
    for (int r = 0; r < R; r += R2) tile<R2, 2>(w, a, n0 + r, b);
  for (; b < a.B; ++b) tile<R, 1>(w, a, n0, b);
}

// fp32 rows past N (the last partial block) are taken one at a time; grid blocks are padded to 4 rows.
template <class W>
inline void run(const W& w, const Args& a) {
  at::parallel_for(0, (a.N + kBlock - 1) / kBlock, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      int64_t n0 = i * kBlock;
      if (n0 + kBlock <= a.N || std::is_same<W, GridWeights>::value) {
        block<kBlock>(w, a, n0);
      } else {
        for (int64_t n = n0; n < a.N; ++n) block<1>(w, a, n);
      }
    }
  });
}

// --- small row kernels ---

// e^x, 8 lanes, to ~2 ulp (Cephes' polynomial, as in avx_mathfun); x clamped to [-88.38, 88.38].
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// y[i] = e^(x[i] - shift), returning their sum. y may be x.
inline float exp_shifted(const float* x, float shift, float* y, int64_t n) {
  __m256 acc = _mm256_setzero_ps(), s = _mm256_set1_ps(shift);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
    _mm256_storeu_ps(y + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (y[i] = std::exp(x[i] - shift));
  return sum;
}

// m[i] = act(g[i]) * u[i] for n values: act 0 GELU with the tanh approximation, tanh(z) = 1 - 2 / (1 + e^2z);
// act 1 SiLU, g / (1 + e^-g).
inline void gated(const float* g, const float* u, float* m, int64_t n, int64_t act) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f), two = _mm256_set1_ps(2.0f);
  const __m256 alpha = _mm256_set1_ps(0.7978845608028654f), beta = _mm256_set1_ps(0.044715f);  // sqrt(2 / pi)
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(g + i), a;
    if (act == 0) {
      __m256 z = _mm256_mul_ps(alpha, _mm256_fmadd_ps(_mm256_mul_ps(beta, x), _mm256_mul_ps(x, x), x));
      __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(one, exp8(_mm256_mul_ps(two, z)))));
      a = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, t));
    } else {
      a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    }
    _mm256_storeu_ps(m + i, _mm256_mul_ps(a, _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) {
    const float x = g[i];
    const float a = act == 0 ? 0.5f * x * (1.0f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)))
                             : x / (1.0f + std::exp(-x));
    m[i] = a * u[i];
  }
}

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w for `rows` rows of D (the sum of squares in double). y may be x.
inline void rms_rows(const float* x, const float* w, float* y, int64_t rows, int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
    float inv = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * w[d];
  }
}

// NeoX (rotate-half) RoPE of `heads` rows of d: y = x * cos + rotate_half(x) * sin, rotate_half(x) =
// (-x[d/2:], x[:d/2]); cos, sin [d] shared by the heads. y may be x.
inline void rope_heads(const float* x, const float* c, const float* s, float* y, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xr = x + h * d;
    float* yr = y + h * d;
    for (int64_t i = 0; i < half; ++i) {
      float a = xr[i], b = xr[i + half];
      yr[i] = a * c[i] + (-b) * s[i];
      yr[i + half] = b * c[i + half] + a * s[i + half];
    }
  }
}

// Scores of NH query heads q [NH, d] against n key rows k [n, d]: p[h * n + j] = scale * q[h] . k[j]. Two key
// rows at a time for all NH heads: 2 NH independent accumulator chains hide the FMA latency, and each key row
// is read once.
template <int NH>
inline void score_rows(const float* q, const float* k, float* p, int64_t n, int64_t d, float scale) {
  const int64_t d8 = d / 8 * 8;
  int64_t j = 0;
  for (; j + 2 <= n; j += 2) {
    const float *k0 = k + j * d, *k1 = k0 + d;
    __m256 a0[NH], a1[NH];
    for (int h = 0; h < NH; ++h) a0[h] = a1[h] = _mm256_setzero_ps();
    for (int64_t i = 0; i < d8; i += 8) {
      const __m256 x0 = _mm256_loadu_ps(k0 + i), x1 = _mm256_loadu_ps(k1 + i);
      for (int h = 0; h < NH; ++h) {
        const __m256 qv = _mm256_loadu_ps(q + h * d + i);
        a0[h] = _mm256_fmadd_ps(qv, x0, a0[h]);
        a1[h] = _mm256_fmadd_ps(qv, x1, a1[h]);
      }
    }
    for (int h = 0; h < NH; ++h) {
      float s0 = hsum(a0[h]), s1 = hsum(a1[h]);
      for (int64_t t = d8; t < d; ++t) s0 += q[h * d + t] * k0[t], s1 += q[h * d + t] * k1[t];
      p[h * n + j] = s0 * scale;
      p[h * n + j + 1] = s1 * scale;
    }
  }
  for (; j < n; ++j)
    for (int h = 0; h < NH; ++h) p[h * n + j] = dot(q + h * d, k + j * d, d) * scale;
}

// out[h * d + i] = sum_j p[h * n + j] v[j, i] for NH heads over n value rows v [n, d]. Rows go in blocks of 16
// (16 KB at d = 256: they stay in L1 across the column passes), 16 columns at a time per pass.
template <int NH>
inline void weigh_values(const float* p, const float* v, float* out, int64_t n, int64_t d) {
  constexpr int64_t kRows = 16;
  std::fill(out, out + NH * d, 0.0f);
  for (int64_t j0 = 0; j0 < n; j0 += kRows) {
    const int64_t j1 = std::min(n, j0 + kRows);
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
      __m256 a0[NH], a1[NH];
      for (int h = 0; h < NH; ++h) a0[h] = _mm256_loadu_ps(out + h * d + i), a1[h] = _mm256_loadu_ps(out + h * d + i + 8);
      for (int64_t j = j0; j < j1; ++j) {
        const __m256 v0 = _mm256_loadu_ps(v + j * d + i), v1 = _mm256_loadu_ps(v + j * d + i + 8);
        for (int h = 0; h < NH; ++h) {
          const __m256 w = _mm256_broadcast_ss(p + h * n + j);
          a0[h] = _mm256_fmadd_ps(w, v0, a0[h]);
          a1[h] = _mm256_fmadd_ps(w, v1, a1[h]);
        }
      }
      for (int h = 0; h < NH; ++h) _mm256_storeu_ps(out + h * d + i, a0[h]), _mm256_storeu_ps(out + h * d + i + 8, a1[h]);
    }
    for (; i < d; ++i)
      for (int h = 0; h < NH; ++h)
        for (int64_t j = j0; j < j1; ++j) out[h * d + i] += p[h * n + j] * v[j * d + i];
  }
}

template <int NH>
inline void attend_slice(const float* q, const float* k, const float* v, float* p, float* out, float* mx, float* sum,
                         int64_t n, int64_t d, float scale) {
  score_rows<NH>(q, k, p, n, d, scale);
  for (int h = 0; h < NH; ++h) {
    mx[h] = *std::max_element(p + h * n, p + (h + 1) * n);
    sum[h] = exp_shifted(p + h * n, mx[h], p + h * n, n);
  }
  weigh_values<NH>(p, v, out, n, d);
}

// Softmax attention of one query per head over slots [lo, end): q [H, d], k and v [kvh, cap, d] (head h reads
// kv head h / (H / kvh)), y [H, d]. Scores in fp32, max-subtracted. The work is split into (kv head, slice of
// slots) items across threads, so that a single kv head (GQA) still uses every thread: each item scores its
// slots for the kv head's query heads together (each key and value row read once, up to 4 heads at a time)
// and keeps its own max, sum and unnormalised output; the slices are merged at the end (flash-decoding's
// split softmax).
inline void attend(const float* q, const float* k, const float* v, float* y, int64_t H, int64_t kvh, int64_t cap,
                   int64_t d, int64_t lo, int64_t end, float scale) {
  const int64_t L = end - lo, group = H / kvh;
  const int64_t threads = at::get_num_threads();
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>((threads + kvh - 1) / kvh, L / 64));
  const int64_t per = (L + slices - 1) / slices;
  std::vector<float> outs(kvh * slices * group * d), maxes(kvh * slices * group, -INFINITY),
      sums(kvh * slices * group, 0.0f);
  at::parallel_for(0, kvh * slices, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> p;
    for (int64_t item = begin; item < stop; ++item) {
      const int64_t g = item / slices, j0 = (item % slices) * per, n = std::min(L, j0 + per) - j0;
      if (n <= 0) continue;
      p.resize(4 * n);
      const float* kg = k + (g * cap + lo + j0) * d;
      const float* vg = v + (g * cap + lo + j0) * d;
      for (int64_t h0 = 0; h0 < group; h0 += 4) {
        const float* qh = q + (g * group + h0) * d;
        const int64_t at = item * group + h0;
        float *out = outs.data() + at * d, *mx = maxes.data() + at, *sm = sums.data() + at;
        switch (std::min<int64_t>(4, group - h0)) {
          case 4: attend_slice<4>(qh, kg, vg, p.data(), out, mx, sm, n, d, scale); break;
          case 3: attend_slice<3>(qh, kg, vg, p.data(), out, mx, sm, n, d, scale); break;
          case 2: attend_slice<2>(qh, kg, vg, p.data(), out, mx, sm, n, d, scale); break;
          default: attend_slice<1>(qh, kg, vg, p.data(), out, mx, sm, n, d, scale);
        }
      }
    }
  });
  for (int64_t g = 0; g < kvh; ++g)
    for (int64_t h = 0; h < group; ++h) {
      float m = -INFINITY, total = 0.0f;
      for (int64_t s = 0; s < slices; ++s) m = std::max(m, maxes[(g * slices + s) * group + h]);
      float* out = y + (g * group + h) * d;
      std::fill(out, out + d, 0.0f);
      for (int64_t s = 0; s < slices; ++s) {
        const int64_t at = (g * slices + s) * group + h;
        if (sums[at] == 0.0f) continue;  // an empty slice
        const float w = std::exp(maxes[at] - m);
        total += w * sums[at];
        const float* part = outs.data() + at * d;
        for (int64_t i = 0; i < d; ++i) out[i] += w * part[i];
      }
      const float inv = 1.0f / total;
      for (int64_t i = 0; i < d; ++i) out[i] *= inv;
    }
}

}  // namespace relay_llm
