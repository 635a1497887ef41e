"""Layer-range profiler: measure where relayed K/V deviate, choose the band to rectify, store a profile.

Calibration hand-off: an upstream call generates an output (its decode-phase K/V are stored); a
downstream prompt places that output after other text (other system prompt, other amount of earlier
text, some past the sliding window). Per layer we compare the reused (rotated) K/V with the K/V a
full prefill of the downstream prompt computes.

Band rule (justified by the data in the profile and the sweep in docs/fidelity.md):
* dev_l = 1 - mean value-cosine of layer l. Layer 0 is exact after rotation (its K/V depend only on
  token and position); deviation then grows with depth, not monotonically (gemma-3-270m: 0.990 at
  layer 1, dips over 5-10, recovers at 11-12, dips again at 15 and 17).
* start = the deepest layer s such that every layer up to s keeps value-cosine >= `entry_cos` (0.995).
  Span tokens enter the band with the upstream residual stream of layer s; a layer's value deviation
  is that residual's deviation seen through W_v, so an entry state already off by cos 0.99 carries the
  upstream context into every later layer. Measured on gemma-3-270m (benchmarks/band_sweep.py, 1000-token
  span behind a long new prefix), at equal reuse: entering at layer 1 instead of 0 raised the KL 8-23 %,
  at layer 2 30-75 %, at layer 6 to 0.0142, close to no repair (0.0165).
* end = the last layer whose deviation is >= `tail_fraction` (0.25) of the largest: a late dip that
  matters is inside the band, a negligible tail is reused as-is.
* det = the earliest layer after start whose per-token deviation rank-correlates with the all-layer
  total at >= `det_fraction` (0.6) of the best layer in the band. Every span token is recomputed from
  start to det (the dominant cost), and at det == start the recomputed values would equal the reused
  ones (same entry state), so det > start; past the first informative layer, a later det buys little
  fidelity for much compute (gemma-3-270m: det 1 KL 0.0093 at 68 % reuse, det 2 0.0073 at 62 %).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

from .loading import Fingerprint, cache_dir
from .rope import rotate
from .selector import SelectorConfig

PROFILE_VERSION = 1


@dataclass
class Profile:
    """A model's layer band for the relay schedule, with the measurements it was chosen from."""

    architecture: str
    weights: str
    dtype: str
    num_layers: int
    start_layer: int
    det_layer: int
    end_layer: int
    selector: dict = field(default_factory=lambda: asdict(SelectorConfig()))
    measurements: dict = field(default_factory=dict)
    rule: str = ""
    version: int = PROFILE_VERSION

    @property
    def band(self) -> tuple[int, int, int]:
        return self.start_layer, self.det_layer, self.end_layer

    @property
    def version_key(self) -> str:
        return f"profile-v{self.version}:{self.start_layer}-{self.det_layer}-{self.end_layer}"

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path, fingerprint: Fingerprint | None = None) -> Profile:
        """Read a profile; refuse one of another version or made for other weights."""
        data = json.loads(Path(path).read_text())
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"profile {path} has version {data.get('version')}, expected {PROFILE_VERSION}")
        profile = cls(**data)
        if fingerprint and (profile.architecture, profile.weights) != (fingerprint.architecture, fingerprint.weights):
            raise ValueError(
                f"profile {path} was made for {profile.architecture}:{profile.weights}, not for this model "
                f"({fingerprint.architecture}:{fingerprint.weights}); run `relay-llm profile` for it"
            )
        return profile


def profile_filename(fp: Fingerprint) -> str:
    return f"{fp.architecture}-{fp.weights}.json"


def find_profile(fp: Fingerprint) -> Profile | None:
    """The profile for these weights: in the cache folder, else shipped in the package, else None."""
    name = profile_filename(fp)
    candidates = [cache_dir() / "profiles" / name, Path(str(resources.files("relay_llm") / "data" / "profiles" / name))]
    for path in candidates:
        if path.exists():
            return Profile.load(path, fp)
    return None


# ---- measurement -------------------------------------------------------------------------------------


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom else 0.0


def calibration_handoffs() -> list[dict]:
    """The shipped calibration set: upstream prompts x downstream contexts (relay_llm/data)."""
    data = json.loads((resources.files("relay_llm") / "data" / "calibration.json").read_text())
    filler = data["long_context"]
    out = []
    for up in data["upstream"]:
        for ctx in data["downstream"]:
            prefix = ctx["prefix"].replace("{long_context}", filler)
            out.append({"upstream": up, "prefix": prefix, "question": ctx["question"]})
    return out


@torch.inference_mode()
def measure(engine, handoffs: list[dict], max_new_tokens: int = 64, seed: int = 0, progress=None) -> dict:
    """Per-layer similarity of reused vs recomputed K/V over calibration hand-offs.

    Returns lists over layers: key_cos, value_cos (means over all span tokens), rank_corr (mean over
    hand-offs of Spearman(per-token value deviation at l, summed over layers)), dev_quantiles
    (p50/p90/p99 of per-token value deviation), and the number of hand-offs and span tokens.
    """
    ex = engine.executor
    n_layers = ex.num_layers
    key_cos, val_cos, corr, devs = [], [], [], []
    outputs: dict[str, list[int]] = {}
    for i, h in enumerate(handoffs):
        if progress:
            progress(i, len(handoffs))
        up = h["upstream"]
        if up not in outputs:
            res = engine.complete(engine.render([{"role": "user", "content": up}]), max_new_tokens=max_new_tokens,
                                  temperature=0.8, top_p=0.95, seed=seed + len(outputs), schedule="full")
            outputs[up] = res.token_ids
        out = outputs[up]
        matches = engine.store.find(out, 0, len(out))
        if not matches:
            continue
        m = max(matches, key=lambda x: x.length)
        seg = engine.store.get(m.segment_id)
        pre = engine.encode(h["prefix"] + "\n\n")
        q = engine.encode("\n\n" + h["question"], special_tokens=False)
        span = out[m.start : m.end]
        ids = pre + span + q
        start = len(pre)
        kv = ex.new_buffers(len(ids))
        ex.run(torch.tensor(ids, device=ex.device), 0, kv)
        true_k = kv.keys[:, :, start : start + len(span)].float()
        true_v = kv.values[:, :, start : start + len(span)].float()
        old = seg.keys[:, :, m.offset : m.offset + m.length]
        delta = start - (seg.start_pos + m.offset)
        reused_k = torch.stack([rotate(old[layer], delta, ex.rope[layer]) for layer in range(n_layers)]).float()
        reused_v = seg.values[:, :, m.offset : m.offset + m.length].float()
        # cosine per (layer, token) over all KV heads: [L, T]
        kc = torch.nn.functional.cosine_similarity(true_k.transpose(1, 2).flatten(2),
                                                   reused_k.transpose(1, 2).flatten(2), dim=-1)
        vc = torch.nn.functional.cosine_similarity(true_v.transpose(1, 2).flatten(2),
                                                   reused_v.transpose(1, 2).flatten(2), dim=-1)
        key_cos.append(kc)
        val_cos.append(vc)
        dev = 1 - vc
        total = dev.sum(0)
        corr.append([_spearman(dev[layer], total) for layer in range(n_layers)])
        devs.append(dev)
    if not val_cos:
        raise RuntimeError("no calibration hand-off produced a reusable span")
    kc, vc, dev = torch.cat(key_cos, 1), torch.cat(val_cos, 1), torch.cat(devs, 1)
    q = torch.quantile(dev, torch.tensor([0.5, 0.9, 0.99]), dim=1).T
    return {
        "handoffs": len(val_cos),
        "span_tokens": int(vc.shape[1]),
        "key_cos": [round(float(x), 5) for x in kc.mean(1)],
        "value_cos": [round(float(x), 5) for x in vc.mean(1)],
        "rank_corr": [round(sum(c[layer] for c in corr) / len(corr), 4) for layer in range(n_layers)],
        "dev_quantiles": [[round(float(x), 5) for x in row] for row in q],
    }


def choose_band(value_cos: list[float], rank_corr: list[float], entry_cos: float = 0.995,
                tail_fraction: float = 0.25, det_fraction: float = 0.6) -> tuple[int, int, int]:
    """(start, det, end) by the rule in the module docstring; (1, 1, 0) is the empty band."""
    dev = [max(0.0, 1 - c) for c in value_cos]
    n = len(dev)
    if max(dev) <= 0:
        return 1, 1, 0  # nothing deviates: an empty band (relay == naive)
    start = 0
    while start + 1 < n and value_cos[start + 1] >= entry_cos:
        start += 1
    end = max(layer for layer in range(n) if dev[layer] >= tail_fraction * max(dev))
    if end <= start:
        return 1, 1, 0
    top = max(rank_corr[start + 1 : end + 1])
    det = next(layer for layer in range(start + 1, end + 1) if rank_corr[layer] >= det_fraction * top)
    return start, det, end


RULE = ("start = deepest layer with value_cos >= {entry_cos} at every layer up to it; end = last layer whose "
        "deviation 1 - value_cos is >= {tail_fraction:.0%} of the largest; det = earliest layer after start whose "
        "per-token deviation rank-correlates with the all-layer total >= {det_fraction:.0%} of the best in the band")


def build_profile(engine, handoffs: list[dict] | None = None, max_new_tokens: int = 64, progress=None,
                  **rule) -> Profile:
    """Run the calibration on `engine`'s model and return its profile. rule: choose_band's thresholds."""
    handoffs = handoffs if handoffs is not None else calibration_handoffs()
    m = measure(engine, handoffs, max_new_tokens=max_new_tokens, progress=progress)
    rule = {"entry_cos": 0.995, "tail_fraction": 0.25, "det_fraction": 0.6, **rule}
    start, det, end = choose_band(m["value_cos"], m["rank_corr"], **rule)
    fp = engine.fingerprint
    return Profile(architecture=fp.architecture, weights=fp.weights, dtype=fp.dtype,
                   num_layers=engine.executor.num_layers, start_layer=start, det_layer=det, end_layer=end,
                   measurements=m, rule=RULE.format(**rule))


def plot_profile(profile: Profile, path: Path) -> Path | None:
    """PNG of per-layer key/value cosine and rank correlation with the band shaded; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    m = profile.measurements
    layers = list(range(profile.num_layers))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, m["key_cos"], "o-", label="key cosine")
    ax.plot(layers, m["value_cos"], "s-", label="value cosine")
    ax.set_xlabel("layer")
    ax.set_ylabel("reused vs recomputed cosine")
    ax.axvspan(profile.start_layer - 0.5, profile.end_layer + 0.5, color="orange", alpha=0.2, label="band")
    ax.axvline(profile.det_layer, color="red", ls="--", label=f"det_layer {profile.det_layer}")
    ax2 = ax.twinx()
    ax2.plot(layers, m["rank_corr"], "^:", color="gray", label="rank corr (right)")
    ax2.set_ylabel("rank correlation with total")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower left", fontsize=8)
    ax.set_title(f"{profile.architecture} layer profile ({m['handoffs']} hand-offs, {m['span_tokens']} tokens)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
