"""Recover the integer grid a weight matrix was dequantised from, or put one on a grid.

A model converted from a block-quantised GGUF (Q8_0, Q5_0, Q6_K, Q4_K, ...) holds fp32 weights that are,
group by group along the input dimension, an affine image of small integers:

    w[n, k] = scale[n, g] * q[n, k] + offset[n, g],   g = k // G,   q int8

`find_grid` finds such (q, scale, offset) where they reproduce every weight (symmetric grids bit for bit,
offset grids to within `TOLERANCE` of the group's largest weight, fp32 rounding); multiplying on them is
then lossless, and reads a quarter of the bytes. `quantize` puts any weight on a symmetric int8 grid of
group 32 (absmax / 127 per group, like GGUF's Q8_0): lossy, opt-in as dtype="int8".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 16)  # tried in order: Q8_0 / Q5_0 / Q4_K groups are 32 wide, Q6_K's 16
TOLERANCE = 2.0**-20  # offset grids: |reconstruction - w| <= TOLERANCE * max |w| of the group
_LEVELS = (127, 16, 32, 31, 15, 8, 7, 64, 63)  # max |q| of common symmetric grids (Q8_0, Q5_0, Q6_K, ...)
_SPANS = (15, 31, 63, 7)  # max q - min q of common offset grids (Q4_K, Q5_K, ...)
_ROWS = 8192  # rows per chunk of work (bounds temporary memory)


@dataclass
class Grid:
    """w ~ scale[:, k // G] * q + offset[:, k // G]. q: [N, K] int8; scale, offset: [N, K // G] fp32 (offset None:
    symmetric)."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantised(self) -> torch.Tensor:
        """The fp32 weight [N, K] this grid stands for."""
        n, k = self.q.shape
        w = self.q.float().view(n, -1, self.group) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.view(n, k)


def _fit(g: torch.Tensor, step: torch.Tensor, base: torch.Tensor | None, lo: int, hi: int,
         tol: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q = round((g - base) / step) per group; ok where q is in [lo, hi] and reproduces g within tol.
    g: [m, G]; step, base, tol: [m] -> (q [m, G], ok [m])."""
    shifted = g if base is None else g - base[:, None]
    q = torch.round(shifted / step[:, None])
    recon = q * step[:, None] if base is None else q * step[:, None] + base[:, None]
    ok = ((q >= lo) & (q <= hi)).all(-1) & ((recon - g).abs() <= tol[:, None]).all(-1) & (step > 0)
    return q, ok


def _gcd(values: torch.Tensor, tol: torch.Tensor) -> torch.Tensor:
    """Greatest common step of each row of values [m, G] (>= 0), remainders under tol [m] taken as zero."""
    g = values[:, 0].clone()
    for j in range(1, values.shape[1]):
        x, y = torch.maximum(g, values[:, j]), torch.minimum(g, values[:, j])
        for _ in range(64):
            live = y > tol
            if not live.any():
                break
            r = torch.fmod(x, torch.where(live, y, torch.ones_like(y)))
            r = torch.where(y - r <= tol, torch.zeros_like(r), r)
            x, y = torch.where(live, y, x), torch.where(live, r, torch.zeros_like(r))
        g = x
    return g


def _symmetric(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q [m, G], scale [m]) with g == scale * q exactly, |q| <= 127; None if some group has none."""
    amax = g.abs().amax(-1)
    exact = torch.zeros_like(amax)
    q = torch.zeros_like(g)
    scale = torch.where(amax > 0, amax, torch.ones_like(amax))
    todo = amax > 0  # an all-zero group: q = 0
    for level in _LEVELS:
        idx = todo.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        step = amax[idx] / level
        qi, ok = _fit(g[idx], step, None, -127, 127, exact[idx])
        q[idx[ok]], scale[idx[ok]], todo[idx[ok]] = qi[ok], step[ok], False
    idx = todo.nonzero().squeeze(-1)
    if idx.numel():  # the rest: the greatest common divisor of the group's magnitudes
        step = _gcd(g[idx].abs(), amax[idx] / 1024)
        qi, ok = _fit(g[idx], step, None, -127, 127, exact[idx])
        if not ok.all():
            return None
        q[idx], scale[idx] = qi, step
    return q, scale


def _with_offset(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q [m, G], scale [m], offset [m]) with g ~ scale * q + offset, q in [0, 127]; None if some group has none."""
    lo, hi = g.amin(-1), g.amax(-1)
    tol = g.abs().amax(-1) * TOLERANCE
    q, scale = torch.zeros_like(g), torch.ones_like(lo)
    todo = torch.ones_like(lo, dtype=torch.bool)
    for span in _SPANS:
        idx = todo.nonzero().squeeze(-1)
        if idx.numel() == 0:
            break
        step = (hi[idx] - lo[idx]) / span
        qi, ok = _fit(g[idx], step, lo[idx], 0, 127, tol[idx])
        q[idx[ok]], scale[idx[ok]], todo[idx[ok]] = qi[ok], step[ok], False
    flat = todo & (hi == lo)  # one value: q = 0
    todo &= ~flat
    idx = todo.nonzero().squeeze(-1)
    if idx.numel():
        rough = _gcd(g[idx] - lo[idx, None], (hi[idx] - lo[idx]) / 1024)
        span = torch.round((hi[idx] - lo[idx]) / rough.clamp_min(1e-30))
        step = (hi[idx] - lo[idx]) / span.clamp_min(1)
        qi, ok = _fit(g[idx], step, lo[idx], 0, 127, tol[idx])
        if not ok.all():
            return None
        q[idx], scale[idx] = qi, step
    return q, scale, lo


_PROBE_ROWS = 64


def find_grid(weight: torch.Tensor) -> Grid | None:
    """The grid `weight` [N, K] lies on (the first of `GROUP_SIZES` that fits), or None. Its first rows are
    tried first, so weights on no grid (most HF checkpoints) cost a few milliseconds, not a full search."""
    n, k = weight.shape
    w = weight.detach().float()
    for size in GROUP_SIZES:
        if k % size:
            continue
        probe = w[:_PROBE_ROWS].reshape(-1, size)
        if _symmetric(probe) is None and _with_offset(probe) is None:
            continue
        qs, scales, offsets, symmetric = [], [], [], True
        for rows in w.split(_ROWS):
            g = rows.reshape(-1, size)
            found = _symmetric(g)
            if found is not None:
                q, scale = found
                offset = torch.zeros_like(scale)
            else:
                found = _with_offset(g)
                if found is None:
                    break
                (q, scale, offset), symmetric = found, False
            qs.append(q.to(torch.int8).view(rows.shape))
            scales.append(scale.view(rows.shape[0], -1))
            offsets.append(offset.view(rows.shape[0], -1))
        else:
            return Grid(torch.cat(qs), torch.cat(scales), None if symmetric else torch.cat(offsets))
    return None


def quantize(weight: torch.Tensor, size: int = 32) -> Grid:
    """`weight` [N, K] on a symmetric int8 grid of group `size`: scale = absmax / 127 per group (lossy)."""
    n, k = weight.shape
    g = weight.detach().float().reshape(n, k // size, size)
    scale = (g.abs().amax(-1) / 127).clamp_min(1e-12)
    q = torch.round(g / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return Grid(q.view(n, k), scale, None)
