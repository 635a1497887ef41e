"""Token log-probabilities (GenerationOptions.logprobs) on tiny models: values, top lists, alignment, validation."""

import pytest
import torch

from relay_llm.engine import GenerationOptions

from .test_generation import _boundary_stop


def _prompt() -> list[int]:
    return torch.randint(3, 500, (12,), generator=torch.Generator().manual_seed(0)).tolist()


def _check_against_teacher_force(engine, ids: list[int], res, k: int) -> None:
    """Each entry is the raw distribution's: equal to a full-prefill teacher-forced pass at the chosen ids."""
    assert len(res.logprobs) == len(res.token_ids)
    ref = engine.teacher_force(ids, res.token_ids, schedule="full")
    for row, tok, entry in zip(ref, res.token_ids, res.logprobs, strict=True):
        assert entry["token_id"] == tok and entry["token"] == engine._token_texts([tok])[0]
        assert entry["logprob"] == pytest.approx(float(row[tok]), abs=1e-4)
        values = [v for _, _, v in entry["top"]]
        assert len(entry["top"]) == k and values == sorted(values, reverse=True)
        assert values == pytest.approx(torch.topk(row, k).values.tolist(), abs=1e-4)
        assert [t for _, t, _ in entry["top"]] == engine._token_texts([i for i, _, _ in entry["top"]])


def _assert_same(a: list[dict], b: list[dict]) -> None:
    """Equal entries up to fp noise (a prefix-cache hit may change the prefill's rounding)."""
    assert [(e["token_id"], e["token"], [t[:2] for t in e["top"]]) for e in a] == [
        (e["token_id"], e["token"], [t[:2] for t in e["top"]]) for e in b]
    values = [v for e in a for v in (e["logprob"], *(t[2] for t in e["top"]))]
    assert values == pytest.approx([v for e in b for v in (e["logprob"], *(t[2] for t in e["top"]))], abs=1e-4)


def test_greedy_logprobs_equal_teacher_forcing_and_top1_is_chosen(tiny):
    ids = _prompt()
    res = tiny.complete(ids, max_new_tokens=10, schedule="full", logprobs=3)
    _check_against_teacher_force(tiny, ids, res, 3)
    assert all(e["top"][0][0] == e["token_id"] for e in res.logprobs)  # greedy: the chosen token is the top-1


def test_logprobs_are_taken_before_penalties(tiny):
    ids = _prompt()
    res = tiny.complete(ids, max_new_tokens=10, schedule="full", logprobs=2, frequency_penalty=2.0,
                        repetition_penalty=1.5)
    _check_against_teacher_force(tiny, ids, res, 2)


def test_no_logprobs_unless_asked(tiny):
    ids = _prompt()
    assert tiny.complete(ids, max_new_tokens=5).logprobs is None
    assert all(c.logprobs is None for c in tiny.stream(ids, max_new_tokens=5))
    res = tiny.complete(ids, max_new_tokens=5, logprobs=0)
    assert len(res.logprobs) == 5 and all(e["top"] == [] for e in res.logprobs)


def test_stream_carries_logprobs_on_the_last_chunk_only(tiny):
    ids = _prompt()
    whole = tiny.complete(ids, max_new_tokens=8, logprobs=2)
    chunks = list(tiny.stream(ids, max_new_tokens=8, logprobs=2))
    assert all(c.logprobs is None for c in chunks[:-1])
    _assert_same(chunks[-1].logprobs, whole.logprobs)


def test_logprobs_stay_aligned_with_token_ids_before_a_stop_string(tiny):
    ids = _prompt()
    full = tiny.complete(ids, max_new_tokens=30, logprobs=1)
    res = tiny.complete(ids, max_new_tokens=30, stop=[_boundary_stop(tiny, ids)], logprobs=1)
    assert res.finish_reason == "stop" and len(res.token_ids) < res.stats.completion_tokens
    assert [e["token_id"] for e in res.logprobs] == res.token_ids
    _assert_same(res.logprobs, full.logprobs[: len(res.token_ids)])


@pytest.mark.parametrize("k", [-1, 21, True, 1.5, "3"])
def test_bad_logprobs_raise(k):
    with pytest.raises(ValueError, match="logprobs"):
        GenerationOptions(logprobs=k).check()
