"""Fast CPU kernels for the model's linears, chosen per machine at load.

Decode reads every weight once per token, so its speed is the speed of the matmul kernel on one row.
torch's default fp32 `F.linear` (MKL) is 2x slower than oneDNN on weights reordered once into its
blocked layout (the path torch inductor uses); batched rows gain more. bf16 weights run on oneDNN's AMX /
AVX512-BF16 kernels where the CPU has them; int8 weight-only linears (per-output-row scales, bf16
activations) run on `torch._weight_int8pack_mm`.

On AVX2 + FMA CPUs, relay-llm's own GEMV (`native`, `csrc/gemv.cpp`) beats both for decode's few rows: fp32
weights stream at memory speed, and weights that lie on an int8 grid (`grid.find_grid`: every model converted
from a block-quantised GGUF, the default model included) are read as int8, a quarter of the bytes, losslessly.

`accelerate(model, weights)` swaps every `nn.Linear` of the decoder layers and the LM head for one of
the modules below, after checking on this machine that the kernel runs and matches `F.linear`; where it
does not, the plain modules stay and the returned `KernelInfo` says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import grid as grid_lib
from . import native

log = logging.getLogger("relay_llm")

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU features among `_CPU_FLAGS` that this machine has (from /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(f for f in line.split(":", 1)[1].split() if f in _CPU_FLAGS)
    return frozenset()


def native_bf16() -> bool:
    """True where the CPU multiplies bf16 natively (AMX or AVX512-BF16): bf16 GEMMs run at full speed."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


class PackedLinear(nn.Module):
    """y = x W^T + b on a weight reordered once for oneDNN (fp32 or bf16).

    weight: the packed [out, in] weight (opaque mkldnn layout). x: [..., in] -> [..., out], dtype of x.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, None), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """Weight-only int8: W ~ scale[o] * q[o, :], q in [-127, 127], one scale per output row (absmax).

    x: [..., in] bf16 -> [..., out] bf16; the product accumulates in fp32 inside the kernel. From
    `GEMM_ROWS` rows on (prefill), the weight is dequantised for the call and multiplied on a GEMM kernel
    (bf16 where the CPU multiplies bf16 natively, else fp32): the int8 kernel is a GEMV, slow on many rows.
    """

    GEMM_ROWS = 16

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8),
                             persistent=False)
        self.register_buffer("scale", scale.to(torch.bfloat16), persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if flat.shape[0] >= self.GEMM_ROWS:
            dt = torch.bfloat16 if native_bf16() else torch.float32
            w = self.qweight.to(dt) * self.scale.to(dt)[:, None]
            y = F.linear(flat.to(dt), w).to(torch.bfloat16)
        else:
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class GemvLinear(nn.Module):
    """fp32 y = x W^T + b: up to `GEMV_ROWS` rows (decode) on relay-llm's GEMV, more (prefill) on `F.linear`
    (up to `PACKED_ROWS` on oneDNN packed weights where `packed` is set).

    weight: [out, in] fp32, what many-row calls multiply by (the linear's own weight; for a lossy grid, its
    dequantised weight). grid: where set, decode reads the weight from it: q packed [ceil(out/4), in/8, 4, 8]
    int8, scale and offset [out, in/G] fp32 (`grid.Grid`, `pack`). x: [..., in] fp32 -> [..., out] fp32.
    """

    GEMV_ROWS = 8
    PACKED_ROWS = 128  # up to this many rows on `packed` where set (`_pack_sparse_rows`), more on F.linear

    def __init__(self, linear: nn.Linear, grid: grid_lib.Grid | None = None, weight: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach() if weight is None else weight, persistent=False)
        self.bias = None if linear.bias is None else linear.bias.detach().float().contiguous()
        self.grid = grid is not None
        if grid is not None:
            self.register_buffer("q", pack(grid.q), persistent=False)
            self.register_buffer("scale", grid.scale.contiguous(), persistent=False)
            self.register_buffer("offset", None if grid.offset is None else grid.offset.contiguous(),
                                 persistent=False)
        self.packed: torch.Tensor | None = None  # oneDNN layout of `weight`, for GEMV_ROWS+1..PACKED_ROWS rows
        self._ops = native.ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > self.GEMV_ROWS or flat.dtype != torch.float32:
            if self.packed is not None and flat.shape[0] <= self.PACKED_ROWS and flat.dtype == torch.float32:
                y = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), self.packed, self.bias, "none", [], "")
                return y.view(*x.shape[:-1], self.out_features)
            return F.linear(x, self.weight, self.bias)
        flat = flat.contiguous()
        if self.grid:
            y = self._ops.gemv_grid(flat, self.q, self.scale, self.offset, self.bias)
        else:
            y = self._ops.gemv_f32(flat, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def pack(q: torch.Tensor) -> torch.Tensor:
    """int8 q [N, K] -> [ceil(N/4), K/8, 4, 8]: blocks of 4 rows (zero rows past N), 8 weights of each in turn."""
    n, k = q.shape
    n4 = -(-n // 4) * 4
    if n4 != n:
        q = torch.cat([q, q.new_zeros(n4 - n, k)])
    return q.view(n4 // 4, 4, k // 8, 8).permute(0, 2, 1, 3).contiguous()


class RowsOf(nn.Module):
    """Output columns [lo, hi) of a fused linear: what q_proj / k_proj / v_proj (and gate_proj / up_proj) become
    once fused. `decoder.LeanLayer` calls `fused` once per layer; HF's own forward (the reference path) still
    works, computing the fused product once per part."""

    def __init__(self, fused: nn.Module, lo: int, hi: int):
        super().__init__()
        self.fused, self.lo, self.hi = fused, lo, hi
        self.in_features, self.out_features = fused.in_features, hi - lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)[..., self.lo : self.hi]


def _concat(parts: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear whose output is the parts' outputs side by side (missing biases as zeros)."""
    w = torch.cat([p.weight.detach() for p in parts])
    has_bias = any(p.bias is not None for p in parts)
    fused = nn.Linear(w.shape[1], w.shape[0], bias=has_bias, dtype=w.dtype, device=w.device)
    fused.weight = nn.Parameter(w, requires_grad=False)
    if has_bias:
        fused.bias = nn.Parameter(torch.cat([p.bias.detach() if p.bias is not None else
                                             torch.zeros(p.out_features, dtype=w.dtype) for p in parts]),
                                  requires_grad=False)
    return fused


FUSED_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


def fuse_projections(model) -> None:
    """In every decoder layer, concatenate q/k/v and gate/up into one linear each (`RowsOf` views), in place:
    decode then makes 4 matmul calls per layer instead of 7."""
    for layer in model.model.layers:
        for owner_name, names in FUSED_GROUPS:
            owner = getattr(layer, owner_name, None)
            parts = [getattr(owner, n, None) for n in names]
            if owner is None or not all(isinstance(p, nn.Linear) for p in parts):
                continue
            fused, lo = _concat(parts), 0
            for name, part in zip(names, parts, strict=True):
                setattr(owner, name, RowsOf(fused, lo, lo + part.out_features))
                lo += part.out_features


@dataclass(frozen=True)
class KernelInfo:
    """Which linear kernel a model runs on. path: "relay-gemv" | "onednn-packed" | "int8-weight-only" | "plain"."""

    path: str
    weights: str  # "float32" | "bfloat16" | "int8" | ...
    reason: str = ""  # why the plain path, where it is plain
    cpu: tuple[str, ...] = ()
    lean_layers: bool = True  # run layers through `decoder.LeanLayer` (False: HF's own forward, kernels="plain")

    def describe(self) -> str:
        text = f"{self.path} {self.weights} linears"
        return f"{text} ({self.reason})" if self.reason else text


def _linears(model) -> dict[nn.Linear, list[tuple[nn.Module, str]]]:
    """Every nn.Linear of the decoder layers plus the LM head, in order -> the (parent, attribute) places holding
    it (a fused linear sits in each of its `RowsOf` views)."""
    out: dict[nn.Linear, list[tuple[nn.Module, str]]] = {}
    for parent in [model, *model.model.layers.modules()]:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and (parent is not model or name == "lm_head"):
                out.setdefault(child, []).append((parent, name))
    return out


def _probe(make: type[nn.Module], dtype: torch.dtype) -> str:
    """'' if `make`'s kernel runs here and matches F.linear on a small random case, else why not."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=True).to(dtype)
    x = torch.randn(3, 64, dtype=dtype)
    try:
        got = make(lin)(x).float()
    except (RuntimeError, NotImplementedError) as exc:
        return f"{make.__name__} kernel unavailable: {str(exc).splitlines()[0][:120]}"
    want = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    tol = 1e-4 if make is PackedLinear and dtype == torch.float32 else 0.1
    if not torch.allclose(got, want, atol=tol, rtol=tol):
        return f"{make.__name__} kernel disagrees with F.linear (max |diff| {(got - want).abs().max():.2e})"
    return ""


def _plain_is_faster(linears: list[nn.Module], rows: int = 1, repeats: int = 5) -> bool:
    """Time `rows`-row products through `linears` on F.linear and on oneDNN packed weights (1: decode's shape)."""
    import time

    packed = [PackedLinear(lin) for lin in linears]
    x = [torch.randn(rows, lin.in_features, dtype=lin.weight.dtype) for lin in linears]

    def best(mods) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for m, xi in zip(mods, x, strict=True):
                m(xi)
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.inference_mode():
        best(linears), best(packed)  # warm up
        return best(linears) < best(packed)


def native_unavailable(model: nn.Module) -> str:
    """'' where `model` (or a layer of it) can run on relay-llm's native ops (fp32 weights on a CPU where the
    kernels build): `accelerate`'s GEMV, and the lean layers' norms, RoPE and attention; else why not."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        return f"relay-llm's GEMV runs fp32 on CPU, not {param.dtype} on {param.device.type}"
    return native.unavailable()


def _accelerate_gemv(model, lossy: bool, cpu: tuple[str, ...]) -> KernelInfo:
    """Every linear (in_features a multiple of 8) onto a `GemvLinear`: on its exact int8 grid where it has one,
    else fp32 (lossy: else quantised onto an int8 grid, `grid.quantize`)."""
    fuse_projections(model)
    counts = {"exact": 0, "quantised": 0, "fp32": 0, "plain": 0}
    for linear, places in _linears(model).items():
        w = linear.weight
        if w.dtype != torch.float32 or w.shape[1] % 8:
            counts["plain"] += 1
            continue
        grid, weight = grid_lib.find_grid(w), None
        if grid is not None:
            counts["exact"] += 1
        elif lossy:
            grid = grid_lib.quantize(w, 32 if w.shape[1] % 32 == 0 else 8)
            weight = grid.dequantised()
            counts["quantised"] += 1
        else:
            counts["fp32"] += 1
        fast = GemvLinear(linear, grid, weight)
        for parent, name in places:
            setattr(parent, name, fast)
    note = ", ".join(f"{n} {kind}" for kind, n in (("on exact int8 grids", counts["exact"]),
                     ("quantised to int8", counts["quantised"]), ("fp32", counts["fp32"]),
                     ("on torch's F.linear (in_features not a multiple of 8)", counts["plain"])) if n)
    if _pack_sparse_rows(model):
        note += f"; {GemvLinear.GEMV_ROWS + 1}-{GemvLinear.PACKED_ROWS}-row products on oneDNN packed weights"
    info = KernelInfo("relay-gemv", "int8" if counts["quantised"] else "float32", f"linears: {note}", cpu)
    log.info("relay-llm kernels: %s", info.describe())
    return info


def _pack_sparse_rows(model) -> bool:
    """Give the layers' GEMV linears oneDNN packed copies of their weights for products of GEMV_ROWS+1 to
    PACKED_ROWS rows (a sparse prefill's active sets: relay's repaired tokens and the new ones), where layer 0's
    linears measure faster on them at 48 rows than on F.linear. The LM head keeps F.linear (its copy would
    be the largest tensor of the model). Returns whether it packed."""
    if not torch.backends.mkldnn.is_available():
        return False
    head = getattr(model, "lm_head", None)
    layers = [m for m in dict.fromkeys(model.modules()) if isinstance(m, GemvLinear) and m is not head]
    if not layers or _plain_is_faster(layers[:4], rows=48):  # packed unset: F.linear at 48 rows
        return False
    for m in layers:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight, None)
    return True


def accelerate(model, weights: str = "native", kernels: str = "auto") -> KernelInfo:
    """Swap the model's linears for this machine's fastest kernel for `weights`, in place.

    weights: "native" (keep the model's dtype) or "int8" (int8 weights). kernels: "auto" (the fastest kernel
    that runs here: relay-llm's GEMV for an fp32 model where it builds, else oneDNN packed where it runs and
    matches), "packed" (oneDNN packed) or "plain" (keep torch's default modules). On relay-llm's GEMV, "native"
    is lossless (fp32 weights, or their exact int8 grid) and "int8" puts the other weights on an int8 grid too;
    elsewhere "int8" is weight-only int8 for a bf16 model. Returns what was done; a log line says it too.
    """
    param = next(model.parameters())
    dtype_name = str(param.dtype).removeprefix("torch.")
    cpu = tuple(sorted(cpu_flags()))
    if kernels == "auto" and not native_unavailable(model):
        return _accelerate_gemv(model, lossy=weights == "int8", cpu=cpu)
    if weights == "int8":
        if param.dtype != torch.bfloat16:
            raise ValueError("int8 weight-only linears need a bfloat16 model (activations run in bf16)")
        make, path, shown = Int8Linear, "int8-weight-only", "int8"
    elif weights == "native":
        make, path, shown = PackedLinear, "onednn-packed", dtype_name
    else:
        raise ValueError(f"unknown weights {weights!r}: use 'native' or 'int8'")
    reason = ""
    if kernels == "plain":
        reason = "kernels='plain' asked for"
    elif kernels not in ("auto", "packed"):
        raise ValueError(f"unknown kernels {kernels!r}: use 'auto', 'packed' or 'plain'")
    elif param.device.type != "cpu":
        reason = f"{param.device.type} device: torch's own kernels"
    elif make is PackedLinear and param.dtype not in (torch.float32, torch.bfloat16):
        reason = f"no packed kernel for {dtype_name}"
    elif make is PackedLinear and not torch.backends.mkldnn.is_available():
        reason = "torch built without oneDNN"
    else:
        reason = _probe(make, param.dtype)
    if reason and weights == "int8":
        raise RuntimeError(f"int8 weight-only linears cannot run on this machine: {reason}")
    if reason:
        if kernels != "plain":
            fuse_projections(model)
        info = KernelInfo("plain", shown, reason, cpu, lean_layers=kernels != "plain")
        log.info("relay-llm kernels: %s", info.describe())
        return info
    fuse_projections(model)
    linears = _linears(model)
    groups = {"head": [lin for lin in linears if lin is model.lm_head],
              "layers": [lin for lin in linears if lin is not model.lm_head]}
    kept = []
    for group, members in groups.items():
        if make is PackedLinear and kernels == "auto" and _plain_is_faster(members[:4]):  # the head, or layer 0
            kept.append(group)  # measured: torch's default kernel is faster here for one row
            continue
        for linear in members:
            fast = make(linear)
            for parent, name in linears[linear]:
                setattr(parent, name, fast)
    if len(kept) == len(groups):
        info = KernelInfo("plain", shown, "measured faster than oneDNN packed here", cpu)
    else:
        note = f"{' and '.join(kept)} on torch's default kernel: measured faster here" if kept else ""
        info = KernelInfo(path, shown, note, cpu)
    log.info("relay-llm kernels: %s", info.describe())
    return info
