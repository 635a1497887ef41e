// relay-llm's torch ops (registered in library.cpp as torch.ops.relay_llm.*). All tensors fp32 except q (int8).
#pragma once

#include <ATen/ATen.h>

namespace relay_llm {

// x [B, K], w [N, K], bias [N] | None -> y [B, N] = x w^T + bias.
at::Tensor gemv_f32(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias);

// x [B, K], q [ceil(N/4), K/8, 4, 8] int8 (`kernels.pack`), scale [N, K/G], offset [N, K/G] | None,
// bias [N] | None -> y [B, N], with w[n, k] = scale[n, k/G] * q[n, k] + offset[n, k/G].
at::Tensor gemv_grid(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                     const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias);

// x [..., D], w [D] -> x / sqrt(mean(x^2) + eps) * w.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);

// x [1, n, heads, d], cos and sin [1, n, d] -> NeoX (rotate-half) RoPE of x.
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

// q [H, d], k and v [kv_heads, capacity, d] -> [H, d]: one query per head over slots [lo, end), GQA, no mask.
at::Tensor attend_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t lo, int64_t end,
                      double scale);

// Checks k, v: contiguous [kv_heads, capacity, d] fp32, alike.
void check_kv(const at::Tensor& k, const at::Tensor& v);

// One decoder layer for B decode rows, each its own sequence (see layer.cpp) -> the layer's output [B, hidden].
at::Tensor decode_layer(const at::Tensor& x, const c10::List<c10::optional<at::Tensor>>& norms,
                        const c10::List<c10::optional<at::Tensor>>& linears, const at::Tensor& cos,
                        const at::Tensor& sin, at::TensorList keys, at::TensorList values, at::IntArrayRef pos,
                        at::IntArrayRef lo, int64_t heads, int64_t kv_heads, double eps, double scale,
                        int64_t act);

// y = x w^T + bias through gemv_grid when `scale` is set (w is then q), else gemv_f32.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                  const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias);

}  // namespace relay_llm
