"""Sampling penalties (relay_llm.sampling): the exact formulas, and their effect on tiny models' generations."""

import json

import jsonschema
import pytest
import torch

from relay_llm.sampling import LOGIT_LIMIT, apply_penalties, argmax

USER = [{"role": "user", "content": "The architect writes a specification for the developer."}]
PROMPT = torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(0)).tolist()


def test_penalty_formulas_on_hand_made_logits():
    logits = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, 3.0])
    ids = torch.tensor([0, 1, 2, 3])  # 0, 1 only in the prompt; 2 generated twice, 3 once; 4, 5 never seen
    counts = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0, 0.0])

    out = logits.clone()
    apply_penalties(out, ids, counts, presence=0.25, frequency=0.5)
    assert out.tolist() == [2.0, -2.0, 1.0 - 0.5 * 2 - 0.25, -1.0 - 0.5 - 0.25, 0.5, 3.0]

    out = logits.clone()
    apply_penalties(out, ids, counts, repetition=2.0)  # positive logits divided, negative ones multiplied
    assert out.tolist() == [1.0, -4.0, 0.5, -2.0, 0.5, 3.0]

    out = logits.clone()
    apply_penalties(out, ids, counts, presence=-0.5, frequency=1.0, repetition=0.5)  # repetition first
    assert out.tolist() == [4.0, -1.0, 2.0 - 2.0 + 0.5, -0.5 - 1.0 + 0.5, 0.5, 3.0]


def test_extreme_repetition_penalties_stay_finite():
    logits = torch.tensor([2.0, -2.0, 0.0, 1.0])
    ids = torch.tensor([0, 1, 2])
    for p in (1e-320, 1e308):
        out = logits.clone()
        apply_penalties(out, ids, torch.zeros(4), repetition=p)
        assert out.isfinite().all() and out.abs().max() <= LOGIT_LIMIT and out[3] == 1.0


def test_default_penalties_change_nothing(tiny):
    plain = tiny.complete(PROMPT, max_new_tokens=20, schedule="full")
    explicit = tiny.complete(PROMPT, max_new_tokens=20, schedule="full", presence_penalty=0.0,
                             frequency_penalty=0.0, repetition_penalty=1.0)
    assert explicit.token_ids == plain.token_ids
    # greedy is still the model's own argmax, step by step (teacher_force measures the unpenalised model)
    logprobs = tiny.teacher_force(PROMPT, plain.token_ids, schedule="full")
    assert logprobs.argmax(-1).tolist() == plain.token_ids
    penalised = tiny.complete(PROMPT, max_new_tokens=20, schedule="full", frequency_penalty=2.0)
    assert torch.equal(tiny.teacher_force(PROMPT, plain.token_ids, schedule="full"), logprobs)
    assert penalised.token_ids != plain.token_ids


def test_large_frequency_penalty_stops_greedy_repeats(tiny):
    plain = tiny.chat(USER, max_new_tokens=30, schedule="full")
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # a random model loops under greedy decoding
    penalised = tiny.chat(USER, max_new_tokens=30, schedule="full", frequency_penalty=2.0)
    assert len(penalised.token_ids) == 30 and len(set(penalised.token_ids)) == 30


def test_repetition_penalty_changes_a_greedy_continuation_that_repeats_the_prompt(tiny):
    prompt = PROMPT + tiny.complete(PROMPT, max_new_tokens=60, schedule="full").token_ids
    plain = tiny.complete(prompt, max_new_tokens=15, schedule="full")
    assert set(plain.token_ids) & set(prompt)  # the continuation repeats prompt tokens
    penalised = tiny.complete(prompt, max_new_tokens=15, schedule="full", repetition_penalty=1.5)
    assert penalised.token_ids != plain.token_ids


def test_seeded_sampling_with_penalties_is_reproducible(tiny):
    opts = dict(max_new_tokens=15, temperature=1.0, top_k=50, presence_penalty=0.5, frequency_penalty=0.5,
                repetition_penalty=1.2)
    a = tiny.chat(USER, seed=3, **opts)
    b = tiny.chat(USER, seed=3, **opts)
    assert a.token_ids == b.token_ids


@pytest.mark.parametrize("opts, match", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in"),
    ({"frequency_penalty": -3.0}, "frequency_penalty must be in"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be in"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be"),
    ({"repetition_penalty": -1.0}, "repetition_penalty must be"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be"),
])
def test_bad_penalties_are_value_errors(tiny_engines, opts, match):
    engine = tiny_engines["llama"]
    with pytest.raises(ValueError, match=match):
        engine.chat(USER, max_new_tokens=2, **opts)
    assert engine.chat(USER, max_new_tokens=2).stats.completion_tokens == 2


CHOICE = {"type": "object", "properties": {"pick": {"enum": ["yes", "no"]}, "ok": {"type": "boolean"}},
          "required": ["pick", "ok"]}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_penalties_keep_constrained_output_valid(tiny_engines, temperature):
    pytest.importorskip("xgrammar", reason="constrained decoding needs xgrammar")
    res = tiny_engines["llama"].chat(
        [{"role": "user", "content": "Choose."}], response_format={"type": "json_schema", "schema": CHOICE},
        max_new_tokens=40, temperature=temperature, seed=0, frequency_penalty=2.0, presence_penalty=2.0,
        repetition_penalty=3.0)
    assert res.finish_reason == "stop"
    jsonschema.validate(json.loads(res.text), CHOICE)


def test_a_vanishing_temperature_is_greedy(tiny):
    """temperature 1e-300 passes the API's [0, 2] range; dividing the logits by it would overflow to inf / NaN."""
    greedy = tiny.complete(PROMPT, max_new_tokens=10, schedule="full")
    tiny_t = tiny.complete(PROMPT, max_new_tokens=10, schedule="full", temperature=1e-300, seed=1)
    assert tiny_t.token_ids == greedy.token_ids


def test_argmax_picks_the_first_largest_like_torch():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        row = torch.randint(-3, 4, (262144,), generator=g).float()  # many ties
        row[torch.randint(0, 262144, (1000,), generator=g)] = float("-inf")  # a grammar mask
        assert argmax(row) == int(torch.argmax(row))
    masked = torch.full((10,), float("-inf"))
    masked[7] = 0.0
    assert argmax(masked) == 7
    with torch.inference_mode():
        assert argmax(torch.tensor([1.0, 3.0, 3.0])) == 1
