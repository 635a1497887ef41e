// torch.ops.relay_llm: schemas and CPU implementations (ops.h documents each op).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(relay_llm, m) {
  m.def("gemv_f32(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("gemv_grid(Tensor x, Tensor q, Tensor scale, Tensor? offset, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("attend_one(Tensor q, Tensor k, Tensor v, int lo, int end, float scale) -> Tensor");
  m.def("decode_layer(Tensor x, Tensor?[] norms, Tensor?[] linears, Tensor cos, Tensor sin, Tensor(a!)[] keys, "
        "Tensor(b!)[] values, int[] pos, int[] lo, int heads, int kv_heads, float eps, float scale, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(relay_llm, CPU, m) {
  m.impl("gemv_f32", relay_llm::gemv_f32);
  m.impl("gemv_grid", relay_llm::gemv_grid);
  m.impl("rms_norm", relay_llm::rms_norm);
  m.impl("rope", relay_llm::rope);
  m.impl("attend_one", relay_llm::attend_one);
  m.impl("decode_layer", relay_llm::decode_layer);
}
