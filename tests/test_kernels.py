"""Fast kernels (relay_llm.kernels, relay_llm.decoder) reproduce the plain path: HF's own layer forward on
torch's default linears. fp32 to float rounding; bf16 and int8 within their precision, against fp32."""

import pytest
import torch

from relay_llm import RelayEngine, kernels, loading
from relay_llm.decoder import LeanLayer
from relay_llm.kernels import Int8Linear, PackedLinear, RowsOf

from .tiny import FAMILIES


def _logits(engine: RelayEngine, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [len(ids) - prefill + 1, vocab]: the prefill's last row, then one decode step per token."""
    ex = engine.executor
    kv = ex.new_buffers(len(ids))
    rows = [ex.run(ids[:prefill], 0, kv).logits]
    rows += [ex.run(ids[i : i + 1], i, kv).logits for i in range(prefill, len(ids))]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    """family -> {"plain", "packed"} fp32 engines and {"bf16", "int8"} engines of the same weights."""
    out = {}
    for family in FAMILIES:
        path = str(tiny_dirs[family])
        out[family] = {"plain": RelayEngine.load(path, dtype="float32", kernels="plain"),
                       "packed": RelayEngine.load(path, dtype="float32", kernels="packed"),
                       "bf16": RelayEngine.load(path, dtype="bfloat16", kernels="packed"),
                       "int8": RelayEngine.load(path, dtype="int8")}
    yield out
    for group in out.values():
        for e in group.values():
            e.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_lean_path_equals_plain_path_in_fp32(engines, family):
    plain, fast = engines[family]["plain"], engines[family]["packed"]
    assert plain.executor.lean is None and fast.executor.lean is not None  # two different code paths
    assert all(isinstance(c, LeanLayer) for c in fast.executor._calls)
    layer = fast.model.model.layers[0]
    assert isinstance(fast.model.lm_head, PackedLinear) and isinstance(layer.self_attn.o_proj, PackedLinear)
    assert isinstance(layer.mlp.up_proj, RowsOf) and isinstance(layer.mlp.up_proj.fused, PackedLinear)
    assert fast.executor.lean[0].qkv is not None and fast.executor.lean[0].gate_up is not None  # one call each
    assert fast.info()["kernels"] == "onednn-packed" and plain.info()["kernels"] == "plain"
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(4))
    want, got = _logits(plain, ids, 32), _logits(fast, ids, 32)
    assert (got - want).abs().max().item() < 1e-4
    with torch.inference_mode():  # and both equal the model's own one-shot forward
        ref = plain.model(ids[None]).logits[0, 31:].float()
    assert (got - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_and_int8_stay_close_to_fp32(engines, family):
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(5))
    ref = torch.log_softmax(_logits(engines[family]["plain"], ids, 32), -1)
    for name in ("bf16", "int8"):
        got = torch.log_softmax(_logits(engines[family][name], ids, 32), -1)
        kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
        assert kl < 0.02, (name, kl)
    assert isinstance(engines[family]["int8"].model.lm_head, Int8Linear)
    assert engines[family]["int8"].fingerprint.dtype == "int8"  # its K/V never mix with bf16's


def test_int8_linear_is_the_dequantised_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    q = Int8Linear(lin)
    w = q.qweight.float() * q.scale.float()[:, None]
    for rows in (5, Int8Linear.GEMM_ROWS + 3):  # the int8 GEMV kernel, and the dequantised GEMM of prefill
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        want = x.float() @ w.T + lin.bias.float()
        assert (q(x).float() - want).abs().max().item() < 0.05
    assert (w - lin.weight.float()).abs().max().item() <= lin.weight.float().abs().max().item() / 127 + 1e-3


def test_packed_linear_keeps_leading_dims():
    lin = torch.nn.Linear(32, 24)
    x = torch.randn(2, 3, 32)
    got = PackedLinear(lin)(x)
    assert got.shape == (2, 3, 24)
    assert (got - lin(x)).abs().max().item() < 1e-5


def test_missing_kernel_falls_back_to_plain_and_says_why(tiny_dirs, monkeypatch):
    # Mock: this machine's torch has oneDNN; a build without it cannot be run here.
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    engine = RelayEngine.load(str(tiny_dirs["llama"]), dtype="float32", kernels="packed")
    try:
        info = engine.info()
        assert info["kernels"] == "plain" and "oneDNN" in info["kernels_note"]
        assert isinstance(engine.model.lm_head, torch.nn.Linear)
        assert isinstance(engine.model.model.layers[0].self_attn.q_proj, RowsOf)  # fused all the same
        assert info["lean_layers"]  # the lean layer forward needs no special kernel
        assert engine.chat([{"role": "user", "content": "hi"}], max_new_tokens=3).stats.completion_tokens == 3
    finally:
        engine.close()


def test_fast_dtype_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert loading.fast_dtype() == "bfloat16"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2"}))
    assert loading.fast_dtype() == "int8"
    assert loading.fast_dtype(torch.device("cuda")) == "bfloat16"


def test_bad_kernel_settings(tiny_dirs):
    with pytest.raises(ValueError, match="unknown kernels"):
        loading.load(str(tiny_dirs["llama"]), kernels="fastest")
    fp32_model = loading.load(str(tiny_dirs["llama"]), dtype="float32", kernels="plain")[0]
    with pytest.raises(ValueError, match="int8 weight-only linears need a bfloat16 model"):
        kernels.accelerate(fp32_model, weights="int8")


@pytest.mark.real_model
def test_real_model_fast_paths_equal_plain(default_engine):
    """The default model: packed + lean fp32 equals the plain path to fp32 rounding; prefill and decode."""
    packed = RelayEngine.load("default", dtype="float32", kernels="packed")
    plain = RelayEngine.load("default", dtype="float32", kernels="plain")
    try:
        ids = torch.tensor(default_engine.render([{"role": "user", "content": "Write a spec for a word counter."}]))
        ids = torch.cat([ids, torch.tensor([2094, 603, 476, 1105, 235265, 714])])
        want = _logits(plain, ids, len(ids) - 6)
        for engine in (packed, default_engine):  # forced packed, and whatever "auto" measured fastest here
            got = _logits(engine, ids, len(ids) - 6)
            assert (got - want).abs().max().item() < 2e-3
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    finally:
        packed.close()
        plain.close()
