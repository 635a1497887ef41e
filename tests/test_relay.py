"""The relay schedule, its selector, the profile, and the CacheBlend / EPIC baselines."""

import json

import pytest
import torch

from relay_llm.loading import Fingerprint
from relay_llm.profiler import Profile, build_profile, choose_band
from relay_llm.selector import SelectorConfig, select, value_deviation


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _handoff(engine, seed: int = 0):
    """An output generated upstream, then placed after new text (positions move: rotation + repair)."""
    out = engine.complete(_ids(25, seed), max_new_tokens=24).token_ids
    engine.prefix_cache.clear()
    return _ids(19, seed + 1) + out + _ids(7, seed + 2), _ids(6, seed + 3)


def _everything(engine) -> dict:
    last = engine.executor.num_layers - 1
    return {"start_layer": 0, "det_layer": 0, "end_layer": last, "tau_dev": 0.0, "min_span_tokens": 1}


def test_relay_selecting_everything_over_all_layers_reproduces_full(tiny):
    prompt, cont = _handoff(tiny)
    full = tiny.teacher_force(prompt, cont, schedule="full")
    relay = tiny.teacher_force(prompt, cont, schedule="relay", relay=_everything(tiny))
    assert (relay - full).abs().max().item() < 1e-4
    naive = tiny.teacher_force(prompt, cont, schedule="naive")
    assert (naive - full).abs().max().item() > 1e-3  # the hand-off really deviates


def test_relay_with_empty_band_reproduces_naive(tiny):
    prompt, cont = _handoff(tiny, seed=10)
    naive = tiny.teacher_force(prompt, cont, schedule="naive")
    relay = tiny.teacher_force(prompt, cont, schedule="relay",
                               relay={"start_layer": 1, "det_layer": 1, "end_layer": 0, "min_span_tokens": 1})
    assert (relay - naive).abs().max().item() < 1e-6
    stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay",
                          relay={"start_layer": 1, "det_layer": 1, "end_layer": 0, "min_span_tokens": 1}).stats
    assert stats.reuse_rate == 1.0 and stats.recomputed_cells == 0


@pytest.mark.parametrize("capture_layer", [1, 0])
def test_relay_recomputes_part_of_the_band(tiny, capture_layer):
    """Band [1, 2], det 1. With upstream hidden states stored for layer 1, span tokens enter there;
    without them (captured for layer 0 only), they are computed from layer 0."""
    tiny.capture_layer = capture_layer
    try:
        prompt, _ = _handoff(tiny, seed=20)
    finally:
        tiny.set_profile(None)
    settings = {"start_layer": 1, "det_layer": 1, "end_layer": 2, "min_span_tokens": 1, "suffix": 2,
                "max_span_deviation": 2.0}
    stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay", relay=settings).stats
    assert stats.span_tokens == 24
    entry_cells = 24 * (1 - capture_layer)  # every span token from its entry layer up to det (1)
    selected = stats.recomputed_cells - entry_cells  # the edges and the tokens over threshold, at layers 1 and 2
    assert 2 * 2 <= selected < 2 * 24
    assert 0 < stats.reuse_rate < 1


def test_quality_guard_recomputes_a_deviating_span(tiny):
    prompt, cont = _handoff(tiny, seed=30)
    n_layers = tiny.executor.num_layers
    settings = {"start_layer": 0, "det_layer": 0, "end_layer": 0, "min_span_tokens": 1, "max_span_deviation": -1.0}
    res = tiny.complete(prompt, max_new_tokens=1, schedule="relay", relay=settings)
    assert "mean deviation" in res.stats.fallback
    assert res.stats.recomputed_cells == 24 * n_layers
    full = tiny.teacher_force(prompt, cont, schedule="full")
    guarded = tiny.teacher_force(prompt, cont, schedule="relay", relay=settings)
    assert (guarded - full).abs().max().item() < 1e-4


def test_relay_recomputes_each_spans_first_and_last_tokens_through_the_band(tiny):
    """With the thresholds out of reach, relay recomputes exactly `prefix` + `suffix` tokens per span from det on
    (det 0: at every layer; the detection computes only values at det)."""
    prompt, cont = _handoff(tiny, seed=35)
    last = tiny.executor.num_layers - 1
    settings = {"start_layer": 0, "det_layer": 0, "end_layer": last, "tau_dev": 1e9, "tau_inf": 1e9,
                "min_span_tokens": 1, "max_span_deviation": 2.0}
    for prefix, suffix in ((0, 0), (3, 0), (3, 2), (30, 0)):
        stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay",
                              relay={**settings, "prefix": prefix, "suffix": suffix}).stats
        assert stats.span_tokens == 24
        assert stats.recomputed_cells == min(prefix + suffix, 24) * (last + 1)
    full = tiny.teacher_force(prompt, cont, schedule="full")
    whole = tiny.teacher_force(prompt, cont, schedule="relay", relay={**settings, "prefix": 24, "suffix": 0})
    assert (whole - full).abs().max().item() < 1e-4  # a prefix covering the span is full recompute


def test_relay_without_detection_recomputes_only_the_edges_at_every_layer(tiny):
    """detect=False: no detection pass; the first `prefix` tokens of the span at every layer of the band,
    nothing else (the suffix rule belongs to the detection); a prefix covering the span is full recompute,
    none is naive."""
    prompt, cont = _handoff(tiny, seed=36)
    last = tiny.executor.num_layers - 1
    settings = {"start_layer": 0, "det_layer": 0, "end_layer": last, "min_span_tokens": 1, "detect": False}
    for prefix, suffix in ((0, 0), (4, 0), (3, 2)):
        stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay",
                              relay={**settings, "prefix": prefix, "suffix": suffix}).stats
        assert stats.span_tokens == 24
        assert stats.recomputed_cells == prefix * (last + 1)
    full = tiny.teacher_force(prompt, cont, schedule="full")
    naive = tiny.teacher_force(prompt, cont, schedule="naive")
    whole = tiny.teacher_force(prompt, cont, schedule="relay", relay={**settings, "prefix": 24, "suffix": 0})
    none = tiny.teacher_force(prompt, cont, schedule="relay", relay={**settings, "prefix": 0, "suffix": 0})
    assert (whole - full).abs().max().item() < 1e-4
    assert (none - naive).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="detect must be true or false"):
        tiny.complete(prompt, max_new_tokens=1, schedule="relay", relay={**settings, "detect": 1})


def test_detection_computes_every_selected_token_from_det_on(tiny, monkeypatch):
    """Layers before det: every span token. From det on, a token is computed at a layer only if it was at the
    layer before: a token that skipped det_layer would enter the next layer with a stale residual stream.
    The detection itself (k/v-projections at det) selects some tokens, not all."""
    from relay_llm import schedules

    seen: list[torch.Tensor] = []
    span_active = schedules._RelayPlan.span_active
    monkeypatch.setattr(schedules._RelayPlan, "span_active", lambda self, state: seen.append(
        span_active(self, state).clone()) or seen[-1])
    prompt, _ = _handoff(tiny, seed=37)
    last = tiny.executor.num_layers - 1
    settings = {"start_layer": 0, "det_layer": 1, "end_layer": last, "min_span_tokens": 1, "prefix": 2,
                "suffix": 0, "max_span_deviation": 2.0}
    stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay", relay=settings).stats
    assert stats.span_tokens == 24 and len(seen) == last + 1
    assert seen[0].all()
    assert 2 <= seen[1].sum() < 24
    for before, after in zip(seen[1:], seen[2:], strict=False):
        assert not (after & ~before).any()


def test_detection_runs_only_where_the_context_ahead_of_a_span_changed(tiny):
    """detect_changed: a span pasted after the very prompt it was generated from (no context changed) gets
    the edge rule alone; the same span after other text goes through the detection."""
    first = _ids(25, 50)
    out = tiny.complete(first, max_new_tokens=24).token_ids
    last = tiny.executor.num_layers - 1
    settings = {"start_layer": 0, "det_layer": 1, "end_layer": last, "min_span_tokens": 1, "prefix": 2,
                "suffix": 0, "tau_dev": 0.0, "max_span_deviation": 2.0, "detect_changed": 20}
    for before, detected in ((first, False), (_ids(30, 51), True)):
        tiny.prefix_cache.clear()
        stats = tiny.complete(before + out + _ids(5, 52), max_new_tokens=1, schedule="relay",
                              relay=settings).stats
        assert stats.span_tokens == 24
        # detection with tau_dev 0 selects every token; without it, the 2 edge tokens at every layer
        assert stats.recomputed_cells == (24 if detected else 2) * (last + 1), (before, stats)


def test_edges_apply_at_every_piece_of_a_span_split_by_a_hole():
    """A span split by a re-tokenisation hole is one logical span, but each piece's first tokens follow ids the
    stored copy never saw next to them: both pieces get the prefix rule, only the span's end the suffix."""
    from types import SimpleNamespace

    from relay_llm.matcher import Match
    from relay_llm.schedules import PrefillPlan, Relay

    spans = [Match(segment_id=1, start=2, offset=0, length=10), Match(segment_id=1, start=13, offset=11, length=8)]
    plan = PrefillPlan(n_tokens=24, num_layers=2, spans=spans, span_hidden=[None, None])
    ex = SimpleNamespace(device=torch.device("cpu"))
    relay = Relay(0, 0, 1, SelectorConfig(prefix=3, suffix=2))
    edges = relay.layer_plan(plan, ex).edges
    want = torch.zeros(18, dtype=torch.bool)
    want[[0, 1, 2, 10, 11, 12, 16, 17]] = True
    assert torch.equal(edges, want)


def test_short_spans_are_not_reused_by_relay(tiny):
    prompt, _ = _handoff(tiny, seed=40)
    settings = {"start_layer": 0, "det_layer": 0, "end_layer": 0, "min_span_tokens": 100}
    stats = tiny.complete(prompt, max_new_tokens=1, schedule="relay", relay=settings).stats
    assert stats.span_tokens == 0 and "too short" in stats.fallback


@pytest.mark.parametrize("schedule, everything, nothing", [
    ("cacheblend", {"ratio": 1.0}, {"ratio": 0.0, "check_layer": -1}),
    ("epic", {"k": 1000}, {"k": 0}),
])
def test_baselines_span_full_and_naive(tiny, schedule, everything, nothing):
    prompt, cont = _handoff(tiny, seed=50)
    full = tiny.teacher_force(prompt, cont, schedule="full")
    naive = tiny.teacher_force(prompt, cont, schedule="naive")
    assert (tiny.teacher_force(prompt, cont, schedule=schedule, relay=everything) - full).abs().max() < 1e-4
    assert (tiny.teacher_force(prompt, cont, schedule=schedule, relay=nothing) - naive).abs().max() < 1e-6


def test_baseline_recompute_counts(tiny):
    prompt, _ = _handoff(tiny, seed=60)
    n_layers = tiny.executor.num_layers
    epic = tiny.complete(prompt, max_new_tokens=1, schedule="epic", relay={"k": 5}).stats
    assert epic.recomputed_cells == 5 * n_layers
    blend = tiny.complete(prompt, max_new_tokens=1, schedule="cacheblend", relay={"ratio": 0.25}).stats
    assert blend.recomputed_cells == 24 * 2 + 6 * (n_layers - 2)  # all through layers 0-1, then 25 %


def test_unknown_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="unknown relay settings"):
        tiny.complete([5] * 4, max_new_tokens=1, schedule="relay", relay={**_everything(tiny), "tau": 1})
    with pytest.raises(ValueError, match="bad settings"):
        tiny.complete([5] * 4, max_new_tokens=1, schedule="epic", relay={"ratio": 1})
    with pytest.raises(ValueError, match="no profile"):
        tiny.complete([5] * 4, max_new_tokens=1, schedule="relay")


# ---- selector ----------------------------------------------------------------------------------------


def test_selector_thresholds_give_known_sets():
    d = torch.tensor([0.1, 0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # mean 0.18: 0.9 >= 1.5 * mean
    s = torch.tensor([0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # mean 0.5: 5 >= 1.45 * mean
    cfg = SelectorConfig(suffix=2, prefix=0)
    assert select(d, s, cfg).nonzero().flatten().tolist() == [1, 2, 8, 9]
    assert select(d, s, SelectorConfig(suffix=0, prefix=0)).nonzero().flatten().tolist() == [1, 2]
    assert select(d, s, SelectorConfig(suffix=0, prefix=0, tau_dev=10, tau_inf=100)).sum() == 0
    capped = select(d, s, SelectorConfig(suffix=2, prefix=0, recompute_budget=0.3))  # 3 of 10: suffix first
    assert capped.nonzero().flatten().tolist() == [1, 8, 9] or capped.nonzero().flatten().tolist() == [2, 8, 9]
    assert capped.sum() == 3
    # The first `prefix` tokens are always selected, and kept first under a budget like the suffix.
    assert select(d, s, SelectorConfig(suffix=0, prefix=1, tau_dev=10, tau_inf=100)).nonzero().flatten().tolist() == [0]
    assert select(d, s, SelectorConfig(suffix=2, prefix=4)).nonzero().flatten().tolist() == [0, 1, 2, 3, 8, 9]
    capped = select(d, s, SelectorConfig(suffix=1, prefix=1, tau_dev=10, tau_inf=100, recompute_budget=0.2))
    assert capped.nonzero().flatten().tolist() == [0, 9]
    with pytest.raises(ValueError, match="prefix must be >= 0"):
        SelectorConfig().updated({"prefix": -1})


def test_value_deviation():
    v = torch.randn(2, 5, 8)
    assert torch.allclose(value_deviation(v, v), torch.zeros(5), atol=1e-6)
    assert torch.allclose(value_deviation(v, -v), torch.full((5,), 2.0), atol=1e-6)


# ---- profile -----------------------------------------------------------------------------------------


def test_choose_band_handles_a_second_late_dip():
    # near-exact through layer 2, a main dip over 5-10, recovery at 11-12, a late dip at 15 and 17
    cos = [1.0, .999, .997, .98, .97, .93, .92, .91, .92, .93, .94, .985, .99, .98, .98, .96, .98, .97]
    corr = [0.0, .3, .4, .5, .6, .7, .8, .95, .97, .96, .9, .5, .4, .5, .5, .6, .5, .6]
    assert choose_band(cos, corr) == (2, 4, 17)  # the late dip at 17 matters: inside the band
    tail = cos[:16] + [.985, .99]  # a negligible tail after the dip at 15 is reused as-is
    assert choose_band(tail, corr) == (2, 4, 15)
    assert choose_band(cos, corr, det_fraction=0.9) == (2, 7, 17)
    assert choose_band(cos, corr, entry_cos=0.9999) == (0, 4, 17)
    assert choose_band([1.0] * 6, [0.0] * 6) == (1, 1, 0)  # nothing deviates: empty band


def test_profile_round_trip_and_fingerprint_check(tmp_path):
    p = Profile(architecture="llama", weights="abc", dtype="float32", num_layers=3, start_layer=1, det_layer=1,
                end_layer=2, measurements={"value_cos": [1, 0.9, 0.95]})
    path = p.save(tmp_path / "p.json")
    assert Profile.load(path, Fingerprint("llama", "abc", "float32")) == p
    with pytest.raises(ValueError, match="was made for llama:abc"):
        Profile.load(path, Fingerprint("llama", "other", "float32"))
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version"):
        Profile.load(path)


def test_profiler_runs_on_a_tiny_model(tiny_engines):
    engine = tiny_engines["gemma3"]
    engine.store.clear()
    handoffs = [{"upstream": f"Topic {i}: the developer writes code.", "prefix": "The reviewer reads. " * (3 + 9 * i),
                 "question": "What is wrong?"} for i in range(3)]
    profile = build_profile(engine, handoffs, max_new_tokens=20)
    m = profile.measurements
    assert m["handoffs"] == 3 and len(m["value_cos"]) == engine.executor.num_layers
    assert m["value_cos"][0] > 0.9999 and m["key_cos"][0] > 0.9999  # layer 0 is exact after rotation
    assert 0 <= profile.start_layer <= profile.det_layer <= profile.end_layer < engine.executor.num_layers
    engine.set_profile(profile)
    try:
        assert engine.default_schedule == "relay" and engine.capture_layer == profile.start_layer
    finally:
        engine.set_profile(None)


def test_profile_command_writes_a_loadable_profile_and_plot(tiny_dirs, tmp_path, capsys):
    from relay_llm.cli import main
    from relay_llm.loading import load

    out = tmp_path / "p.json"
    assert main(["profile", "--model", str(tiny_dirs["qwen3"]), "--out", str(out), "--max-new-tokens", "20"]) == 0
    _, _, fp, _ = load(str(tiny_dirs["qwen3"]))
    profile = Profile.load(out, fp)
    assert profile.measurements["handoffs"] == 24 and out.with_suffix(".png").exists()
    assert f"profile saved to {out}" in capsys.readouterr().out


def test_a_deviation_floor_selects_nothing_where_nothing_changed():
    """Float-noise deviations: the relative rules would still pick the top tokens; under the floor only the
    edges are recomputed. A real deviation above the floor is still selected."""
    dev = torch.full((40,), 1e-5)
    dev[20] = 2e-5  # stands out relatively, yet is noise
    infl = torch.ones(40)
    cfg = SelectorConfig(prefix=2, suffix=3)
    assert select(dev, infl, cfg)[20]
    floored = select(dev, infl, cfg.updated({"dev_floor": 0.005}))
    assert floored.nonzero().flatten().tolist() == [0, 1, 37, 38, 39]
    dev[25] = 0.05
    assert select(dev, infl, cfg.updated({"dev_floor": 0.005}))[25]
