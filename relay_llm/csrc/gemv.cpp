// Tensor-level torch ops over the kernels of kernels.h: argument checks, output allocation, then one kernel
// call. Schemas and registration: library.cpp.
#include "ops.h"

#include "kernels.h"

namespace relay_llm {

namespace {

Args args(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous [B, K] float32");
  TORCH_CHECK(x.size(1) % 8 == 0, "K must be a multiple of 8");
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: [N] float32");
  y = at::empty({x.size(0), N}, x.options());
  return {x.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), x.size(0), x.size(1), N};
}

}  // namespace

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

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias) {
  return scale ? gemv_grid(x, w, *scale, offset, bias) : gemv_f32(x, w, bias);
}

// One pass per row: a decode step normalises a few short rows many times, where ATen's composite costs
// ~40 us a call in dispatch and temporaries.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x: contiguous float32");
  int64_t D = x.size(-1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == D, "w: [D] float32");
  at::Tensor y = at::empty_like(x);
  rms_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), x.numel() / D, D, static_cast<float>(eps));
  return y;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(0) == 1 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x: contiguous [1, n, heads, d] float32");
  int64_t n = x.size(1), heads = x.size(2), d = x.size(3);
  TORCH_CHECK(d % 2 == 0, "d must be even");
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n * d, "cos, sin: [1, n, d] float32");
  at::Tensor y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < n; ++t)
    rope_heads(xp + t * heads * d, cp + t * d, sp + t * d, yp + t * heads * d, heads, d);
  return y;
}

void check_kv(const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(k.dim() == 3 && k.scalar_type() == at::kFloat && k.is_contiguous() && v.sizes() == k.sizes() &&
              v.scalar_type() == at::kFloat && v.is_contiguous(), "k, v: contiguous [kv_heads, capacity, d] float32");
}

at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t lo, int64_t end,
                      double scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q: contiguous [H, d] float32");
  check_kv(k, v);
  int64_t H = q.size(0), d = q.size(1), kvh = k.size(0), cap = k.size(1);
  TORCH_CHECK(k.size(2) == d && H % kvh == 0, "q and k disagree on d, or heads are not a multiple of kv heads");
  TORCH_CHECK(0 <= lo && lo < end && end <= cap, "need 0 <= lo < end <= capacity");
  at::Tensor y = at::empty({H, d}, q.options());
  attend(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), y.data_ptr<float>(), H, kvh, cap, d, lo, end,
         static_cast<float>(scale));
  return y;
}

}  // namespace relay_llm
