"""Fast kernels (relay_llm.kernels, relay_llm.native, relay_llm.decoder) reproduce the plain path: HF's own
layer forward on torch's default linears. fp32 (and exact int8 grids) to float rounding; bf16 and lossy int8
within their precision, against fp32."""

import pytest
import torch
import torch.nn.functional as F

from relay_llm import RelayEngine, grid, kernels, loading, native
from relay_llm.decoder import LeanLayer
from relay_llm.kernels import GemvLinear, Int8Linear, PackedLinear, RowsOf

from .tiny import FAMILIES, make_model

needs_native = pytest.mark.skipif(native.ops() is None, reason=f"no native kernels here: {native.unavailable()}")


def _logits(engine: RelayEngine, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [len(ids) - prefill + 1, vocab]: the prefill's last row, then one decode step per token."""
    ex = engine.executor
    kv = ex.new_buffers(len(ids))
    rows = [ex.run(ids[:prefill], 0, kv).logits]
    rows += [ex.run(ids[i : i + 1], i, kv).logits for i in range(prefill, len(ids))]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    """family -> {"plain", "packed", "auto"} fp32 engines, and {"bf16", "int8", "int8-bf16"} engines of the same
    weights ("int8": auto, on relay-llm's GEMV where it builds; "int8-bf16": torch's int8 kernel, bf16)."""
    out = {}
    for family in FAMILIES:
        path = str(tiny_dirs[family])
        out[family] = {"plain": RelayEngine.load(path, dtype="float32", kernels="plain"),
                       "packed": RelayEngine.load(path, dtype="float32", kernels="packed"),
                       "auto": RelayEngine.load(path, dtype="float32"),
                       "bf16": RelayEngine.load(path, dtype="bfloat16", kernels="packed"),
                       "int8": RelayEngine.load(path, dtype="int8"),
                       "int8-bf16": RelayEngine.load(path, dtype="int8", kernels="packed")}
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


@needs_native
@pytest.mark.parametrize("family", list(FAMILIES))
def test_gemv_lean_path_equals_plain_path_in_fp32(engines, family):
    plain, fast = engines[family]["plain"], engines[family]["auto"]
    assert fast.info()["kernels"] == "relay-gemv" and fast.fingerprint.dtype == "float32"
    layer = fast.model.model.layers[0]
    assert isinstance(fast.model.lm_head, GemvLinear) and not fast.model.lm_head.grid  # random weights: no grid
    assert isinstance(layer.mlp.up_proj, RowsOf) and isinstance(layer.mlp.up_proj.fused, GemvLinear)
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(4))
    want, got = _logits(plain, ids, 32), _logits(fast, ids, 32)
    assert (got - want).abs().max().item() < 1e-4


def _decode_steps(ex, prompts: list[list[int]], steps: int) -> tuple[list[torch.Tensor], list]:
    """Prefill each prompt, then `steps` decode steps: the first sequence alone (`run`), then all in one batched
    `step`. Returns every step's logits and the buffers."""
    kvs = [ex.new_buffers(len(p) + 2 * steps) for p in prompts]
    for p, kv in zip(prompts, kvs, strict=True):
        ex.run(torch.tensor(p), 0, kv)
    logits = []
    for i in range(steps):
        logits.append(ex.run(torch.tensor([7 + i]), kvs[0].length, kvs[0]).logits)
        logits.append(ex.step(torch.tensor([11 + i] * len(kvs)), kvs).logits)
    return logits, kvs


@needs_native
@pytest.mark.parametrize("family", list(FAMILIES))
def test_native_decode_layer_equals_the_python_layer(engines, family, monkeypatch):
    """On the GEMV, a decode step runs each layer as one native call (`decode_layer`), alone and for a batch of
    rows at different positions (past the sliding windows); logits and K/V equal the Python layer's."""
    ex = engines[family]["auto"].executor
    assert all(layer.native_args is not None for layer in ex.lean)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 30, 45)]
    saved = [layer.native_args for layer in ex.lean]
    try:
        for layer in ex.lean:
            layer.native_args = None
        want, want_kvs = _decode_steps(ex, prompts, 3)
    finally:
        for layer, args in zip(ex.lean, saved, strict=True):
            layer.native_args = args
    calls = []
    native_rows = LeanLayer.native_rows
    monkeypatch.setattr(LeanLayer, "native_rows", lambda self, *a: calls.append(a[0].shape[0]) or native_rows(self, *a))
    got, got_kvs = _decode_steps(ex, prompts, 3)
    assert calls == ([1] * len(ex.lean) + [3] * len(ex.lean)) * 3  # one call per layer and step, rows per call
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    for a, b in zip(got_kvs, want_kvs, strict=True):
        assert a.length == b.length
        assert (a.keys - b.keys).abs().max().item() < 1e-5 and (a.values - b.values).abs().max().item() < 1e-5


@needs_native
@pytest.mark.parametrize("family", list(FAMILIES))
def test_weights_on_an_int8_grid_run_on_it_losslessly(tmp_path, family):
    """A model whose fp32 weights were dequantised from int8 grids (as the default model's GGUF) decodes from
    the grids: every linear is read as int8, and the logits equal the plain fp32 path's."""
    path = str(make_model(family, tmp_path / family, on_grid=True))
    plain = RelayEngine.load(path, dtype="float32", kernels="plain")
    fast = RelayEngine.load(path, dtype="float32")
    try:
        linears = [m for m in fast.model.modules() if isinstance(m, GemvLinear)]
        assert linears and all(m.grid for m in linears), fast.info()["kernels_note"]
        assert "on exact int8 grids" in fast.info()["kernels_note"] and fast.fingerprint.dtype == "float32"
        ids = torch.randint(3, 500, (40,), generator=torch.Generator().manual_seed(6))
        want, got = _logits(plain, ids, 24), _logits(fast, ids, 24)
        assert (got - want).abs().max().item() < 1e-4
    finally:
        plain.close()
        fast.close()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_and_int8_stay_close_to_fp32(engines, family):
    ids = torch.randint(3, 500, (48,), generator=torch.Generator().manual_seed(5))
    ref = torch.log_softmax(_logits(engines[family]["plain"], ids, 32), -1)
    for name in ("bf16", "int8", "int8-bf16"):
        got = torch.log_softmax(_logits(engines[family][name], ids, 32), -1)
        kl = (ref.exp() * (ref - got)).sum(-1).mean().item()
        assert kl < 0.02, (name, kl)
    assert isinstance(engines[family]["int8-bf16"].model.lm_head, Int8Linear)
    if native.ops() is not None:  # int8 weights on relay-llm's GEMV: quantised grids, fp32 activations
        head = engines[family]["int8"].model.lm_head
        assert isinstance(head, GemvLinear) and head.grid and engines[family]["int8"].executor.dtype == torch.float32
    for name in ("int8", "int8-bf16"):
        assert engines[family][name].fingerprint.dtype == "int8"  # their K/V never mix with fp32's or bf16's


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 7, 8, 9])
def test_gemv_kernels_equal_f_linear(rows):
    """Every tile shape (4, 2, 1 activation rows; a partial block of weight rows), group sizes with a fixed
    and a run-time chunk count, offsets and bias; more than GEMV_ROWS rows go to F.linear."""
    ops = native.ops()
    gen = torch.Generator().manual_seed(rows)
    for n, k, size, offset in ((13, 64, 32, False), (30, 96, 16, True), (9, 40, 40, True), (64, 128, 32, True)):
        w = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen)
        x = torch.randn(rows, k, generator=gen)
        got = ops.gemv_f32(x, w, bias)
        assert (got - F.linear(x, w, bias)).abs().max().item() < 1e-4
        g = grid.quantize(w, size)
        if offset:
            g.offset = torch.randn(n, k // size, generator=gen)
        dense = g.dequantised()
        got = ops.gemv_grid(x, kernels.pack(g.q), g.scale, g.offset, bias)
        assert (got - F.linear(x, dense, bias)).abs().max().item() < 1e-4
        lin = torch.nn.Linear(k, n)
        module = GemvLinear(lin, g, dense)
        assert (module(x[None]) - F.linear(x[None], dense, lin.bias)).abs().max().item() < 1e-4
        assert module(x[None]).shape == (1, rows, n)


@needs_native
def test_native_rms_norm_equals_torch():
    ops = native.ops()
    for shape in ((1, 1, 640), (1, 5, 4, 256), (3, 64)):
        x, w = torch.randn(shape), torch.randn(shape[-1])
        assert (ops.rms_norm(x, w, 1e-6) - F.rms_norm(x, (shape[-1],), w, 1e-6)).abs().max().item() < 1e-5


@needs_native
def test_native_rope_and_one_query_attention_equal_torch():
    from relay_llm.decoder import _rotate

    ops = native.ops()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 5, 4, 64, generator=gen)
    cos, sin = torch.randn(1, 5, 64, generator=gen), torch.randn(1, 5, 64, generator=gen)
    want = _rotate(x.transpose(1, 2), cos.unsqueeze(1), sin.unsqueeze(1)).transpose(1, 2)
    assert (ops.rope(x, cos, sin) - want).abs().max().item() < 1e-5
    # the last two: slots split across threads and merged (>= 128 slots), query heads in blocks of 4 plus the rest
    for heads, kv_heads, d, lo, end in ((4, 1, 256, 0, 37), (8, 2, 60, 5, 9), (2, 2, 16, 0, 1), (4, 1, 256, 3, 290),
                                        (12, 2, 24, 7, 301)):
        q = torch.randn(heads, d, generator=gen)
        k, v = torch.randn(kv_heads, 310, d, generator=gen), torch.randn(kv_heads, 310, d, generator=gen)
        want = F.scaled_dot_product_attention(q[None, :, None], k[None, :, lo:end], v[None, :, lo:end], scale=0.3,
                                              enable_gqa=True)[0, :, 0]
        assert (ops.attend_one(q, k, v, lo, end, 0.3) - want).abs().max().item() < 1e-5


def _ggml_like(kind: str, n: int = 8, k: int = 64) -> torch.Tensor:
    """fp32 weights the way GGUF block formats dequantise: fp16 block scales times small integers."""
    gen = torch.Generator().manual_seed(len(kind))
    if kind == "q8_0":  # q in [-127, 127], the block's largest weight at +-127
        q = torch.randint(-127, 128, (n, k // 32, 32), generator=gen).float()
        q[..., 0] = 127
        d = (torch.rand(n, k // 32, 1, generator=gen) / 100).half().float()
        return (q * d).view(n, k)
    if kind == "q5_0":  # q - 16 in [-16, 15]
        q = torch.randint(-16, 16, (n, k // 32, 32), generator=gen).float()
        d = (torch.rand(n, k // 32, 1, generator=gen) / 50).half().float()
        return (q * d).view(n, k)
    if kind == "q6_k":  # groups of 16 with their own int scales, q - 32 in [-32, 31], max not always hit
        q = torch.randint(-20, 21, (n, k // 16, 16), generator=gen).float()
        sc = torch.randint(1, 64, (n, k // 16, 1), generator=gen).float()
        d = (torch.rand(n, 1, 1, generator=gen) / 1000).half().float()
        return (q * (d * sc)).view(n, k)
    if kind == "q4_k":  # w = d * sc * q - dmin * m, q in [0, 15]: one fp32 rounding per weight
        q = torch.randint(0, 16, (n, k // 32, 32), generator=gen).float()
        a = (torch.rand(n, k // 32, 1, generator=gen) / 100).half().float()
        b = (torch.rand(n, k // 32, 1, generator=gen) / 10).half().float()
        return (a * q - b).view(n, k)
    raise ValueError(kind)


@pytest.mark.parametrize("kind,size,offset", [("q8_0", 32, False), ("q5_0", 32, False), ("q6_k", 16, False),
                                              ("q4_k", 32, True)])
def test_find_grid_recovers_gguf_block_formats(kind, size, offset):
    w = _ggml_like(kind)
    g = grid.find_grid(w)
    assert g is not None and g.group == size and (g.offset is not None) == offset
    assert g.q.dtype == torch.int8 and g.q.abs().max() <= 127
    if offset:
        assert ((g.dequantised() - w).abs() <= w.abs().amax() * grid.TOLERANCE).all()
    else:
        assert torch.equal(g.dequantised(), w)  # bit for bit


def test_find_grid_refuses_weights_on_no_grid():
    assert grid.find_grid(torch.randn(16, 64)) is None
    assert grid.find_grid(torch.randn(4, 20)) is None  # no group size divides 20
    w = _ggml_like("q8_0")
    w[3, 5] += 1e-4  # one weight off the grid
    assert grid.find_grid(w) is None


def test_quantize_is_within_half_a_step():
    w = torch.randn(8, 64)
    g = grid.quantize(w, 32)
    assert ((g.dequantised() - w).abs() <= g.scale.repeat_interleave(32, 1) / 2 + 1e-7).all()


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
    """relay-llm's GEMV (int8 weights) where it builds, whatever the CPU's bf16; without it, bf16 where the CPU
    multiplies it natively, else torch's int8."""
    monkeypatch.setattr(kernels.native, "unavailable", lambda: "")
    for flags in ({"avx2", "fma", "amx_bf16"}, {"avx2", "fma"}):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert loading.fast_dtype() == "int8"
    monkeypatch.setattr(kernels.native, "unavailable", lambda: "no compiler")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert loading.fast_dtype() == "bfloat16"
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2"}))
    assert loading.fast_dtype() == "int8"
    assert loading.fast_dtype(torch.device("cuda")) == "bfloat16"


def test_without_native_kernels_auto_takes_torchs_and_says_why(tiny_dirs, monkeypatch):
    # Mock: a CPU without AVX2 / a machine without a compiler cannot be had here; native reports it unavailable.
    monkeypatch.setattr(native, "unavailable", lambda: "relay-llm CPU kernels unavailable: the CPU lacks AVX2 or FMA")
    model, _, fp, info = loading.load(str(tiny_dirs["llama"]), dtype="float32")
    assert info.path in ("onednn-packed", "plain") and fp.dtype == "float32"
    assert not any(isinstance(m, GemvLinear) for m in model.modules())
    model, _, fp, info = loading.load(str(tiny_dirs["llama"]), dtype="int8")
    assert info.path == "int8-weight-only" and next(model.parameters()).dtype == torch.bfloat16


def test_bad_kernel_settings(tiny_dirs):
    with pytest.raises(ValueError, match="unknown kernels"):
        loading.load(str(tiny_dirs["llama"]), kernels="fastest")
    fp32_model = loading.load(str(tiny_dirs["llama"]), dtype="float32", kernels="plain")[0]
    with pytest.raises(ValueError, match="int8 weight-only linears need a bfloat16 model"):
        kernels.accelerate(fp32_model, weights="int8", kernels="packed")


@pytest.mark.real_model
def test_real_model_fast_paths_equal_plain(default_engine):
    """The default model: packed + lean fp32, and auto (relay-llm's GEMV on the GGUF's own int8 grids, every
    linear), equal the plain path to fp32 rounding; prefill and decode."""
    packed = RelayEngine.load("default", dtype="float32", kernels="packed")
    plain = RelayEngine.load("default", dtype="float32", kernels="plain")
    try:
        ids = torch.tensor(default_engine.render([{"role": "user", "content": "Write a spec for a word counter."}]))
        ids = torch.cat([ids, torch.tensor([2094, 603, 476, 1105, 235265, 714])])
        want = _logits(plain, ids, len(ids) - 6)
        if native.ops() is not None:
            linears = [m for m in default_engine.model.modules() if isinstance(m, GemvLinear)]
            assert len(linears) == 73 and all(m.grid for m in linears)  # 18 x (qkv, o, gate_up, down) + head
        for engine in (packed, default_engine):  # forced packed, and whatever "auto" chose here
            got = _logits(engine, ids, len(ids) - 6)
            assert (got - want).abs().max().item() < 2e-3
            assert torch.equal(got.argmax(-1), want.argmax(-1))
    finally:
        packed.close()
        plain.close()


def test_sparse_row_products_on_packed_weights_equal_f_linear():
    """GemvLinear's packed path (a sparse prefill's 9-128 active rows) equals F.linear on the same weight to
    fp32 rounding; beyond PACKED_ROWS and at decode's rows it takes its other paths, unchanged."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    lin = torch.nn.Linear(640, 1536)
    fast = kernels.GemvLinear(lin)
    fast.packed = torch.ops.mkldnn._reorder_linear_weight(fast.weight, None)
    with torch.inference_mode():
        for rows in (9, 48, 128, 129, 300):
            x = torch.randn(1, rows, 640)
            ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
            got = fast(x)
            assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-4
        calls = []
        real = torch.ops.mkldnn._linear_pointwise
        try:
            torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(a[0].shape[0]) or real(*a)
            fast(torch.randn(48, 640)), fast(torch.randn(200, 640))
        finally:
            torch.ops.mkldnn._linear_pointwise = real
        assert calls == [48]
