// Decode-shaped linears (a few rows of activations) at memory speed on AVX2 + FMA CPUs.
//
//   relay_llm::gemv_f32(x [B, K] f32, w [N, K] f32, bias [N] f32 | None)                  -> y [B, N] f32
//   relay_llm::rms_norm(x [..., D] f32, w [D] f32, eps)             -> x / sqrt(mean(x^2) + eps) * w, f32
//   relay_llm::rope(x [1, n, heads, d] f32, cos [1, n, d], sin [1, n, d])  -> NeoX (rotate-half) RoPE of x
//   relay_llm::attend_one(q [H, d] f32, k [kvh, cap, d], v [kvh, cap, d], lo, end, scale)
//                                     -> [H, d]: one query per head over slots [lo, end), GQA, no mask
//   relay_llm::gemv_grid(x [B, K] f32, q [ceil(N/4), K/8, 4, 8] int8, scale [N, K/G] f32,
//                        offset [N, K/G] f32 | None, bias [N] f32 | None)                  -> y [B, N] f32
//
// gemv_grid reads weights stored on a grid: w[n, k] = scale[n, g] * q[n, k] + offset[n, g], g = k / G, with
// q packed in blocks of 4 rows (rows past N zero): q[n / 4, k / 8, n % 4, k % 8], so that a block's 4 rows
// stream from one run of memory, 8 weights of each row at a time (`kernels.pack`). It
// computes y[b, n] = sum_g scale[n, g] * (sum_{k in g} x[b, k] q[n, k]) + offset[n, g] * (sum_{k in g} x[b, k]),
// all in fp32: the product with the dequantised weight, up to summation order. G is a multiple of 8.
// Rows of w are split across torch's intra-op (OpenMP) threads; a thread accumulates R weight rows x T
// activation rows at once, so each weight is read from memory once per call. The int8 stream is prefetched
// a line at a time, kPrefetchBytes ahead: the widening work otherwise leaves too few loads in flight to
// stream from DRAM (LM head, 2 Zen 2 cores: 12.9 -> 10.9-12.2 ms; 4 and 16 KB measured alike, within noise;
// prefetching whole blocks at once was slower).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>
#include <type_traits>

namespace {

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
void run(const W& w, const Args& a) {
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

Args args(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous [B, K] float32");
  TORCH_CHECK(x.size(1) % 8 == 0, "K must be a multiple of 8");
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: [N] float32");
  y = at::empty({x.size(0), N}, x.options());
  return {x.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), x.size(0), x.size(1), N};
}

at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat && w.is_contiguous(), "w: contiguous [N, K] float32");
  TORCH_CHECK(x.dim() == 2 && w.size(1) == x.size(1), "x and w disagree on K");
  at::Tensor y;
  Args a = args(x, w.size(0), bias, y);
  run(F32Weights{w.data_ptr<float>()}, a);
  return y;
}

at::Tensor gemv_grid(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "x: [B, K]");
  int64_t N = scale.size(0), K = x.size(1);
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kChar && q.is_contiguous() && q.size(0) == (N + kBlock - 1) / kBlock &&
              q.size(1) * 8 == K && q.size(2) == kBlock && q.size(3) == 8, "q: contiguous [ceil(N/4), K/8, 4, 8] int8");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous(),
              "scale: contiguous [N, K/G] float32");
  int64_t groups = scale.size(1);
  TORCH_CHECK(groups > 0 && K % groups == 0 && (K / groups) % 8 == 0, "group size K/groups must be a multiple of 8");
  at::Tensor xsum;
  if (offset) {
    TORCH_CHECK(offset->sizes() == scale.sizes() && offset->scalar_type() == at::kFloat && offset->is_contiguous(),
                "offset: like scale");
    xsum = x.view({x.size(0), groups, K / groups}).sum(-1).contiguous();
  }
  at::Tensor y;
  Args a = args(x, N, bias, y);
  GridWeights w{q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset ? offset->data_ptr<float>() : nullptr,
                offset ? xsum.data_ptr<float>() : nullptr, groups, K / groups};
  run(w, a);
  return y;
}

// One pass per row: a decode step normalises a few short rows many times, where ATen's composite costs
// ~40 us a call in dispatch and temporaries.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32");
  int64_t D = x.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "w: [D] float32");
  at::Tensor y = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  int64_t rows = x.numel() / D;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * D;
    float* yr = yp + r * D;
    double ss = 0.0;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
    float inv = static_cast<float>(1.0 / std::sqrt(ss / D + eps));
    for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * wp[d];
  }
  return y;
}

// y = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[d/2:], x[:d/2]); cos/sin per token, shared by heads.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: contiguous [1, n, heads, d] float32");
  int64_t n = x.size(1), heads = x.size(2), d = x.size(3), half = d / 2;
  TORCH_CHECK(d % 2 == 0, "d must be even");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * d, "cos, sin: [1, n, d] float32");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t) {
    const float *c = cp + t * d, *s = sp + t * d;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = xp + (t * heads + h) * d;
      float* yr = yp + (t * heads + h) * d;
      for (int64_t i = 0; i < half; ++i) {
        float a = xr[i], b = xr[i + half];
        yr[i] = a * c[i] + (-b) * s[i];
        yr[i + half] = b * c[i + half] + a * s[i + half];
      }
    }
  }
  return y;
}

inline float dot(const float* a, const float* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Softmax attention of one query per head: scores in fp32, max-subtracted, then the weighted sum of values.
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t lo, int64_t end,
                      double scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous [H, d] float32");
  TORCH_CHECK(k.dim() == 3 && k.scalar_type() == at::kFloat && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == at::kFloat && v.is_contiguous(), "k, v: contiguous [kv_heads, capacity, d] float32");
  int64_t H = q.size(0), d = q.size(1), kvh = k.size(0), cap = k.size(1);
  TORCH_CHECK(k.size(2) == d && H % kvh == 0, "q and k disagree on d, or heads are not a multiple of kv heads");
  TORCH_CHECK(0 <= lo && lo < end && end <= cap, "need 0 <= lo < end <= capacity");
  int64_t L = end - lo, group = H / kvh;
  at::Tensor y = at::empty({H, d}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, H, 1, [&](int64_t begin, int64_t stop) {
    std::vector<float> p(L);
    for (int64_t h = begin; h < stop; ++h) {
      const float* qh = qp + h * d;
      const float* kh = kp + ((h / group) * cap + lo) * d;
      const float* vh = vp + ((h / group) * cap + lo) * d;
      float mx = -INFINITY;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = dot(qh, kh + j * d, d) * sc;
        mx = std::max(mx, p[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < L; ++j) {
        p[j] = std::exp(p[j] - mx);
        sum += p[j];
      }
      float* out = yp + h * d;
      std::fill(out, out + d, 0.0f);
      for (int64_t j = 0; j < L; ++j) {
        const float* vr = vh + j * d;
        __m256 w = _mm256_set1_ps(p[j]);
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + i), _mm256_loadu_ps(out + i)));
        for (; i < d; ++i) out[i] += p[j] * vr[i];
      }
      const float inv = 1.0f / sum;
      for (int64_t i = 0; i < d; ++i) out[i] *= inv;
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(relay_llm, m) {
  m.def("gemv_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("gemv_grid(Tensor x, Tensor q, Tensor scale, Tensor? offset, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v, int lo, int end, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(relay_llm, CPU, m) {
  m.impl("gemv_f32", gemv_f32);
  m.impl("gemv_grid", gemv_grid);
  m.impl("rms_norm", rms_norm);
  m.impl("rope", rope);
  m.impl("attend_one", attend_one);
}
