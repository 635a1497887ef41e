"""Finding stored content inside new prompts, however a framework pastes it (issue 4, matching).

A random tiny model cannot write meaningful text, and its sampled ids rarely re-tokenise to themselves, so
the tiny-model tests let an upstream agent "answer" with chosen text: `relay_answer` stores the answer's
K/V as the engine would after generating it (a prefill of question + answer, which equals decode K/V up to
float noise; DESIGN.md section 2). Everything downstream (templates, tokenisation, matching, splicing,
stats) is the engine's own path. The real-model test at the end uses a really generated answer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay_llm.matcher import (
    MIN_PIECE,
    KGramIndex,
    changed_grams,
    chunk_bounds,
    context_sketch,
    select,
    span_groups,
    window_hashes,
)
from relay_llm.schedules import get_schedule
from relay_llm.stats import RequestStats
from relay_llm.store import Segment, SegmentStore

CODE_ANSWER = ("Here is the code:\n```python\ndef add(a, b): return a + b\n```\n"
               "The reviewer reads both the specification and the code, and the developer writes code.")
SPEC_ANSWER = ("The architect writes a specification. The cache keeps keys and values for every token; "
               "rotary position embeddings rotate the keys.")
FOX_ANSWER = "A fox jumps over the lazy dog near the river. Questions end with a question mark? Yes, they do!"
DOC = ("Multi-agent applications pass one model's output into the next prompt. The cache keeps keys and values "
       "for every token; rotary position embeddings rotate the keys. The architect writes a specification. "
       "The developer writes code from the specification, and the reviewer reads both the specification and "
       "the code. A fox jumps over the lazy dog near the river. Numbers like 12, 345 and 6789 appear in text.")


@pytest.fixture
def llama(tiny_engines):
    """The tiny Llama (ChatML template) with an empty store and prefix cache."""
    engine = tiny_engines["llama"]
    engine.store.clear()
    engine.prefix_cache.clear()
    yield engine
    engine.store.clear()
    engine.prefix_cache.clear()


def relay_answer(engine, question: str, answer: str, system: str | None = None) -> list[int]:
    """Store `answer` as the engine's own output to the chat `question` (see the module docstring).

    Returns the answer's token ids as stored (its canonical tokenisation, as a decoder would emit it).
    """
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    prompt = engine.render(msgs)
    ans = engine.encode(answer, special_tokens=False)
    ex = engine.executor
    kv = ex.new_buffers(len(prompt) + len(ans))
    res = ex.run(torch.tensor(prompt + ans), 0, kv, capture_layer=engine.capture_layer)
    keys, values = kv.slice(len(prompt), len(prompt) + len(ans))
    seg = engine._segment(ans, keys, values, len(prompt), res.captured[len(prompt):], "decode", prompt)
    assert engine.store.add(seg)
    return ans


def reuse(engine, request, schedule: str = "naive") -> RequestStats:
    """Stats of a one-token call on `request` (chat messages, or prompt ids)."""
    if isinstance(request, list) and request and isinstance(request[0], dict):
        return engine.chat(request, max_new_tokens=1, schedule=schedule).stats
    return engine.complete(request, max_new_tokens=1, schedule=schedule).stats


def plan_of(engine, ids: list[int], schedule="naive"):
    """(plan, kv buffers) of a prefill of `ids` (stores nothing); schedule: a name or a Schedule."""
    _, kv, plan = engine._prefill(ids, len(ids), get_schedule(schedule), RequestStats())
    return plan, kv


def assert_spans_belong(ids: list[int], plan) -> None:
    """Every reused position holds stored K/V of a token with the same id."""
    for m in plan.spans:
        assert ids[m.start : m.end] == m.segment.token_ids[m.offset : m.offset + m.length].tolist()


def contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i : i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


# ---- the matcher on its own ------------------------------------------------------------------------------


def _store(*contents: list[int], k: int = 8) -> SegmentStore:
    store = SegmentStore(budget_bytes=1 << 30, min_match_tokens=k)
    for ids in contents:
        n = len(ids)
        store.add(Segment(torch.tensor(ids), torch.zeros(1, 1, n, 2), torch.zeros(1, 1, n, 2), 0, "fp"))
    return store


def test_window_hashes_equal_for_equal_windows():
    ids = np.array([5, 6, 7, 8, 5, 6, 7, 8, 9], dtype=np.int64)
    h = window_hashes(ids, 4)
    assert h.shape == (6,) and h[0] == h[4] and len(set(h.tolist())) == 5
    assert window_hashes(ids[:3], 4).shape == (0,)


def test_partial_quotes_of_any_position_are_found_and_short_ones_are_not():
    seg = list(range(1000, 1100))
    store = _store(seg, k=16)
    for a, b in [(0, 16), (37, 60), (84, 100), (10, 95)]:
        prompt = [1, 2, 3] + seg[a:b] + [4, 5]
        (m,) = store.find(prompt)
        assert (m.start, m.offset, m.length) == (3, a, b - a)
    assert store.find([1] + seg[40:55] + [2]) == []  # 15 < min_match_tokens


def test_several_outputs_the_same_one_twice_and_lookup_bounds():
    a, b = list(range(100, 140)), list(range(200, 230))
    store = _store(a, b)
    prompt = [1] * 5 + a + [2] * 3 + b + [3] + a[10:30] + b
    got = [(m.start, m.segment_id, m.offset, m.length) for m in store.find(prompt)]
    assert got == [(5, 0, 0, 40), (48, 1, 0, 30), (79, 0, 10, 20), (99, 1, 0, 30)]
    got = [(m.start, m.length) for m in store.find(prompt, 10, 60)]  # [lo, hi) clips the matches
    assert got == [(10, 35), (48, 12)]


def test_overlapping_candidates_keep_the_longest_and_trim_the_rest():
    long_seg = list(range(300, 360))
    other = list(range(500, 520)) + long_seg[:12]  # shares 12 tokens with long_seg's start
    store = _store(long_seg, other)
    prompt = other[:20] + long_seg
    ms = store.find(prompt)
    assert [(m.segment_id, m.start, m.length) for m in ms] == [(1, 0, 20), (0, 20, 60)]


def test_fingerprint_filter_and_newest_wins_ties():
    ids = list(range(10, 40))
    store = SegmentStore(1 << 30, 8)
    for fp in ("old", "new"):
        store.add(Segment(torch.tensor(ids), torch.zeros(1, 1, 30, 2), torch.zeros(1, 1, 30, 2), 0, fp))
    assert [m.segment.fingerprint for m in store.find([0] + ids)] == ["new"]
    assert [m.segment.fingerprint for m in store.find([0] + ids, fingerprint="old")] == ["old"]
    assert store.find([0] + ids, fingerprint="other") == []


def test_repetitive_content_is_bounded_by_max_candidates():
    index = KGramIndex(4, max_candidates=3)
    seg = np.full(200, 7, dtype=np.int64)
    index.add(0, seg)
    assert len(index) == 197
    runs = index.runs(np.full(50, 7, dtype=np.int64), 0, 50, {0: seg}.get)
    assert runs and all(e - s >= 4 for s, e, _, _ in runs)
    index.remove(0, seg)
    assert len(index) == 0


def test_select_drops_trimmed_pieces_shorter_than_min():
    runs = [(0, 20, 1, 0), (5, 40, 2, 0)]
    ms = select(runs, 8)
    assert [(m.start, m.length, m.segment_id, m.offset) for m in ms] == [(5, 35, 2, 0)]
    ms = select(runs, 5)
    assert [(m.start, m.length, m.segment_id, m.offset) for m in ms] == [(0, 5, 1, 0), (5, 35, 2, 0)]


def test_chunk_bounds_follow_messages_and_skip_small_or_stored_parts():
    B = 0
    ids = [B] + [1] * 10 + [B] + [2] * 100 + [B] + [3] * 30
    computed = [True] * len(ids)
    computed[12:20] = [False] * 8  # e.g. a reused span inside the second message
    assert chunk_bounds(ids, computed, {B}, 20, 50) == [(20, 66), (66, 112), (113, 143)]
    assert chunk_bounds(ids, [False] * len(ids), {B}, 1, 50) == []


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_property_matches_are_stored_stretches(data):
    """Random prompts from random stored stretches and random glue: every match is a stored stretch with
    the same ids (nothing else is reused), at least k long or a piece past a re-tokenisation hole of one
    that is (`matcher.bridge`), matches never overlap, and every pasted piece is found."""
    k = data.draw(st.integers(4, 12), label="k")
    alphabet = data.draw(st.sampled_from([6, 50, 100_000]), label="alphabet")  # small: accidental repeats
    segs = [data.draw(st.lists(st.integers(0, alphabet - 1), min_size=k, max_size=80), label="segment")
            for _ in range(data.draw(st.integers(1, 4)))]
    store = _store(*segs, k=k)
    prompt: list[int] = []
    pieces = []
    for _ in range(data.draw(st.integers(1, 5))):
        prompt += data.draw(st.lists(st.integers(alphabet, alphabet + 50), max_size=10), label="glue")
        s = data.draw(st.sampled_from(segs))
        a = data.draw(st.integers(0, len(s) - 1))
        b = data.draw(st.integers(a + 1, len(s)))
        pieces.append((len(prompt), b - a))
        prompt += s[a:b]
    prompt += data.draw(st.lists(st.integers(alphabet, alphabet + 50), max_size=10), label="glue")
    ms = store.find(prompt)
    covered = np.zeros(len(prompt), dtype=bool)
    for group in span_groups(ms):  # a piece shorter than k was found past a hole next to a k-gram match
        assert any(ms[i].length >= k for i in group)
        assert all(ms[i].length >= min(k, MIN_PIECE) for i in group)
    for m in ms:
        assert prompt[m.start : m.end] == m.segment.token_ids[m.offset : m.offset + m.length].tolist()
        assert not covered[m.start : m.end].any()
        covered[m.start : m.end] = True
    if alphabet == 100_000:  # no accidental matches: each piece of >= k tokens (glue never matches) is found
        for start, n in pieces:
            if n >= 2 * k:
                assert covered[start : start + n].sum() >= n - (k - 1)


# ---- the engine: templates, tokenisation, stats (tiny models) ---------------------------------------------


def test_output_in_an_fstring_template_user_message(llama):
    ans = relay_answer(llama, "Write the specification.", SPEC_ANSWER, system="You are the architect.")
    msgs = [{"role": "system", "content": "You are the reviewer."},
            {"role": "user", "content": f"Here is the spec:\n\n{SPEC_ANSWER}\n\nList its problems."}]
    stats = reuse(llama, msgs)
    assert len(ans) - 4 <= stats.span_kinds.get("decode", 0) <= len(ans)


def test_output_in_jinja_and_langchain_templates(llama):
    from jinja2 import Template
    from langchain_core.prompts import ChatPromptTemplate

    ans = relay_answer(llama, "Write the code.", CODE_ANSWER)
    system = Template("You review {{ lang }} code.\nCode under review:\n{{ code }}\nBe brief.").render(
        lang="Python", code=CODE_ANSWER)
    stats = reuse(llama, [{"role": "system", "content": system}, {"role": "user", "content": "Go."}])
    assert len(ans) - 4 <= stats.span_kinds.get("decode", 0) <= len(ans)

    llama.prefix_cache.clear()
    template = ChatPromptTemplate.from_messages([("system", "You are the tester."),
                                                 ("human", "Write tests for this:\n{code}\nThanks.")])
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    msgs = [{"role": roles[m.type], "content": m.content} for m in template.format_messages(code=CODE_ANSWER)]
    stats = reuse(llama, msgs)
    assert len(ans) - 4 <= stats.span_kinds.get("decode", 0) <= len(ans)


def test_output_as_assistant_history_after_a_new_system_prompt(tiny):
    ans = relay_answer(tiny, "Describe the fox.", FOX_ANSWER)
    msgs = [{"role": "system", "content": "A different agent with a different system prompt."},
            {"role": "user", "content": "Describe the fox."},
            {"role": "assistant", "content": FOX_ANSWER},
            {"role": "user", "content": "Shorter, please."}]
    ids = tiny.render(msgs)
    plan, _ = plan_of(tiny, ids)
    assert_spans_belong(ids, plan)
    assert len(ans) - 4 <= sum(m.length for m in plan.spans) <= len(ans)
    assert reuse(tiny, msgs).span_kinds.get("decode", 0) == sum(m.length for m in plan.spans)


def test_edges_split_by_retokenisation_are_new_tokens(llama):
    """Glue without spaces merges the answer's first and last characters into other tokens."""
    answer = ("ache keeps keys and values for every token; rotary position embeddings rotate the keys. "
              "The developer writes co")
    ans = relay_answer(llama, "Explain the cache.", answer)
    ids = llama.render([{"role": "user", "content": "The c" + answer + "de from the specification."}])
    assert not contains(ids, ans) and not contains(ids, ans[1:]) and not contains(ids, ans[:-1])  # really split
    plan, kv = plan_of(llama, ids)
    assert_spans_belong(ids, plan)
    (m,) = plan.spans
    assert m.length >= len(ans) - 5 and m.offset >= 1 and m.offset + m.length <= len(ans) - 1
    seg = m.segment  # the K/V at each reused position is the stored K/V of that very token
    assert torch.equal(kv.values[:, :, m.start : m.end], seg.values[:, :, m.offset : m.offset + m.length])


def test_changed_token_inside_an_output_splits_it_in_two_spans(llama):
    ans = relay_answer(llama, "Write the specification.", SPEC_ANSWER)
    changed = SPEC_ANSWER.replace("values for", "VALUES for")
    ids = llama.render([{"role": "user", "content": f"Check: {changed}"}])
    plan, _ = plan_of(llama, ids)
    assert_spans_belong(ids, plan)
    assert len(plan.spans) == 2 and all(m.segment_id == plan.spans[0].segment_id for m in plan.spans)
    assert len(ans) - 12 <= sum(m.length for m in plan.spans) < len(ans)


def test_retokenisation_holes_keep_one_span_whole():
    """A stored stretch re-tokenised with a few different ids every ~10 tokens (pieces shorter than k):
    every equal piece is found across the holes, and the pieces form one logical span."""
    rng = np.random.default_rng(0)
    seg_ids = rng.integers(10, 500, 120)
    store = SegmentStore(1 << 30, min_match_tokens=16)
    store.add(_segment(seg_ids.tolist()))
    prompt, expect = list(rng.integers(500, 900, 7)), 0
    at = 0
    for cut in (25, 35, 47, 58, 71, 80, 93):  # 2 stored ids written as 1 to 3 other ids, as BPE would
        prompt += seg_ids[at:cut].tolist() + list(rng.integers(900, 999, 1 + cut % 3))
        expect += cut - at
        at = cut + 2
    prompt += seg_ids[at:].tolist() + list(rng.integers(500, 900, 5))
    expect += 120 - at
    found = store.find(prompt)
    assert sum(m.length for m in found) == expect and len(found) == 8
    assert all(prompt[m.start : m.end] == seg_ids[m.offset : m.offset + m.length].tolist() for m in found)
    assert span_groups(found) == [list(range(8))]
    other = store.find(prompt[:40] + list(rng.integers(500, 900, 6)) + prompt[40:])  # a real gap: 2 groups
    assert len(span_groups(other)) == 2


def _segment(ids: list[int]) -> Segment:
    n = len(ids)
    return Segment(token_ids=torch.tensor(ids), keys=torch.zeros(1, 1, n, 2), values=torch.zeros(1, 1, n, 2),
                   start_pos=0, fingerprint="fp", kind="decode")


def test_relay_repairs_a_span_split_by_holes_only_at_its_real_edges(llama):
    """One quoted output whose re-tokenisation differs at three places: relay reuses it as one span, short pieces
    past the holes included; the prefix rule applies after every hole (those tokens follow ids the stored copy
    never saw: docs/benchmarks.md, "The 5-agent chain"), the suffix rule only at the span's real end."""
    ans = relay_answer(llama, "Write the specification.", SPEC_ANSWER + " " + DOC)
    ids = llama.render([{"role": "user", "content": "Check this: " + SPEC_ANSWER + " " + DOC}])
    at = next(i for i in range(len(ids)) if ids[i : i + 40] == ans[2:42])  # the quote (edges may re-tokenise)
    for pos in (at + 12, at + 25, at + 38):  # three holes: one id written as two others
        ids = ids[:pos] + [7, 9] + ids[pos + 1 :]
    relay = get_schedule("relay", {"min_span_tokens": 16}, band=(1, 1, 2))
    plan, _ = plan_of(llama, ids, relay)
    assert len(plan.spans) == 4 and len(span_groups(plan.spans)) == 1
    stats = RequestStats()
    llama._prefill(ids, len(ids), relay, stats)
    per_piece = get_schedule("relay", {"min_span_tokens": 16}, band=(1, 1, 2))
    per_piece.keep_spans = lambda found: [m for m in found if m.length >= 16]  # as before: pieces alone
    lone = RequestStats()
    llama._prefill(ids, len(ids), per_piece, lone)
    assert stats.span_tokens > lone.span_tokens  # short pieces past the holes are reused too
    cfg = relay.selector
    edges = relay.layer_plan(plan, llama.executor).edges
    want = torch.zeros(sum(m.length for m in plan.spans), dtype=torch.bool)
    at = 0
    for m in plan.spans:
        want[at : at + min(cfg.prefix, m.length)] = True
        at += m.length
    want[at - cfg.suffix :] = True
    assert torch.equal(edges, want)


def test_partial_quote_of_only_the_code_block(llama):
    ans = relay_answer(llama, "Write the code.", CODE_ANSWER)
    quote = "def add(a, b): return a + b"
    q = llama.encode(quote, special_tokens=False)
    assert len(q) >= llama.store.k and contains(ans, q)
    msgs = [{"role": "user", "content": f"Is this line right?\n```\n{quote}\n```\nAnswer yes or no."}]
    ids = llama.render(msgs)
    plan, _ = plan_of(llama, ids)
    assert_spans_belong(ids, plan)
    (m,) = plan.spans  # the quote, and the code fences around it, which match the answer's too
    fenced = llama.encode(f"\n```\n{quote}\n```\n", special_tokens=False)
    assert m.offset > 0 and len(q) - 2 <= m.length <= len(fenced)
    assert reuse(llama, msgs).span_kinds == {"decode": m.length}


def test_two_agents_outputs_and_the_same_output_twice(llama):
    a = relay_answer(llama, "Write the specification.", SPEC_ANSWER, system="You are the architect.")
    b = relay_answer(llama, "Write the code.", CODE_ANSWER, system="You are the developer.")
    msgs = [{"role": "system", "content": "You are the reviewer."},
            {"role": "user", "content": f"Spec:\n{SPEC_ANSWER}\n\nCode:\n{CODE_ANSWER}\n\nSpec again:\n{SPEC_ANSWER}"}]
    ids = llama.render(msgs)
    plan, _ = plan_of(llama, ids)
    assert_spans_belong(ids, plan)
    segs = [m.segment_id for m in plan.spans]
    assert len(plan.spans) == 3 and segs[0] == segs[2] != segs[1]
    total = sum(m.length for m in plan.spans)
    assert 2 * len(a) + len(b) - 12 <= total <= 2 * len(a) + len(b)
    stats = reuse(llama, msgs)
    assert stats.spans == 3 and stats.span_kinds == {"decode": total}


def test_identical_context_reuse_of_an_output_reproduces_full(tiny):
    question = "Write the specification."
    ans = relay_answer(tiny, question, SPEC_ANSWER)
    ids = tiny.render([{"role": "user", "content": question}]) + ans + tiny.encode(" OK", special_tokens=False)
    cont = tiny.encode(" The reviewer reads", special_tokens=False)
    full = tiny.teacher_force(ids, cont, schedule="full")
    naive = tiny.teacher_force(ids, cont, schedule="naive")
    assert (naive - full).abs().max().item() < 1e-4
    assert reuse(tiny, ids).span_kinds == {"decode": len(ans)}


# ---- prompt content (prefill segments) ---------------------------------------------------------------------


def test_rag_document_reappearing_at_another_position_is_reused(llama):
    first = [{"role": "system", "content": "Answer from the context."},
             {"role": "user", "content": f"Context:\n{DOC}\n\nQuestion: what does the reviewer read?"}]
    stats = reuse(llama, first)
    assert stats.span_tokens == 0 and llama.store.stats.by_kind.get("prefill", 0) >= 1
    doc = llama.encode(DOC, special_tokens=False)
    second = [{"role": "system", "content": "You are a careful assistant who cites the context."},
              {"role": "user", "content": f"Question: where does the fox jump?\n\nContext:\n{DOC}"}]
    ids = llama.render(second)
    plan, _ = plan_of(llama, ids)
    assert_spans_belong(ids, plan)
    stats = reuse(llama, second)
    assert stats.prefix_hit_tokens < 10  # only the chat template's opening is a common prefix
    with_label = llama.encode(f"Context:\n{DOC}", special_tokens=False)  # the label matches too
    assert len(doc) - 4 <= stats.span_kinds.get("prefill", 0) <= len(with_label) + 1


def test_long_tool_result_quoted_by_the_next_step(llama):
    result = DOC + " " + SPEC_ANSWER
    step1 = [{"role": "user", "content": "Look up the design notes."},
             {"role": "assistant", "content": "Calling the search tool."},
             {"role": "tool", "content": result}]
    reuse(llama, step1)
    quote = "The developer writes code from the specification, and the reviewer reads both the specification"
    q = llama.encode(quote, special_tokens=False)
    step2 = [{"role": "system", "content": "You write summaries."},
             {"role": "user", "content": f"The notes say: \"{quote}\". Summarise."}]
    stats = reuse(llama, step2)
    assert len(q) - 3 <= stats.span_kinds.get("prefill", 0) <= len(q) + 1


def test_prompt_chunks_are_stored_once_and_small_ones_not_at_all(llama):
    msgs = [{"role": "system", "content": "Short."}, {"role": "user", "content": DOC}]
    reuse(llama, msgs)
    n = len(llama.store)
    assert llama.store.stats.by_kind == {"prefill": 1}  # the short system message is not worth a segment
    llama.prefix_cache.clear()
    stats = reuse(llama, msgs)  # now found as a span: nothing new to store
    assert stats.span_kinds.get("prefill", 0) > 0 and len(llama.store) == n


def test_identical_context_reuse_of_a_prompt_chunk_reproduces_full(tiny):
    ids = tiny.render([{"role": "user", "content": DOC}])
    reuse(tiny, ids)
    tiny.prefix_cache.clear()
    cont = tiny.encode(" The fox", special_tokens=False)
    full = tiny.teacher_force(ids, cont, schedule="full")
    naive = tiny.teacher_force(ids, cont, schedule="naive")
    assert (naive - full).abs().max().item() < 1e-4
    assert reuse(tiny, ids).span_kinds.get("prefill", 0) >= len(tiny.encode(DOC, special_tokens=False)) - 2


WORDS = ["the", "cache", "fox", "code", "xx", "(", ")", ":", "12", "\n", "review", "er", "s", " ", "?", "dog"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_every_reused_position_holds_kv_of_its_own_id(llama, data):
    """Random prompts of random quotes of stored outputs and random glue (no spaces required), through the
    engine's own tokenizer and prefill: reused K/V always come from a stored token with the same id, and
    only stored content is marked reused."""
    llama.store.clear()
    llama.prefix_cache.clear()
    answers = {text: relay_answer(llama, f"Q{i}", text) for i, text in enumerate([SPEC_ANSWER, CODE_ANSWER])}
    parts = []
    for _ in range(data.draw(st.integers(1, 4))):
        parts.append("".join(data.draw(st.lists(st.sampled_from(WORDS), max_size=4))))
        text = data.draw(st.sampled_from(sorted(answers)))
        ans = answers[text]
        a = data.draw(st.integers(0, len(ans) - 1))
        b = data.draw(st.integers(a + 1, len(ans)))
        parts.append(llama._decode(ans[a:b]))
    parts.append("".join(data.draw(st.lists(st.sampled_from(WORDS), max_size=4))))
    ids = llama.encode("".join(parts))
    stats = RequestStats()
    _, kv, plan = llama._prefill(ids, len(ids), get_schedule("naive"), stats)
    assert_spans_belong(ids, plan)
    for m in plan.spans:
        seg = m.segment
        assert torch.equal(kv.values[:, :, m.start : m.end], seg.values[:, :, m.offset : m.offset + m.length])
    assert stats.reused_tokens == stats.span_tokens == int(plan.span_mask().sum())


# ---- the real model ----------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_partial_quote_of_a_code_block_is_reused(default_engine):
    """Only the code part of an earlier generated answer is quoted in a new prompt; it is found and reused."""
    e = default_engine
    e.store.clear()
    e.prefix_cache.clear()
    up = e.complete("Here is a short Python function that adds two numbers:\n```python\ndef add_numbers(",
                    max_new_tokens=40)
    body = [t for t in up.token_ids if t not in e.eos_ids]
    a, b = 4, min(len(body), 30)  # a stretch from inside the generated code, past its first tokens
    quote = e._decode(body[a:b])
    q = e.encode(quote, special_tokens=False)
    assert len(q) >= e.store.k, (quote, up.text)
    msgs = [{"role": "system", "content": "You are a code reviewer."},
            {"role": "user", "content": f"Review only this fragment:\n```\n{quote}\n```\nIs it correct?"}]
    stats = e.chat(msgs, max_new_tokens=1, schedule="naive").stats
    assert stats.span_kinds.get("decode", 0) >= len(q) - 4, (quote, stats)
    assert stats.span_kinds.get("decode", 0) <= len(q) + 1


def test_changed_grams_of_the_context_ahead_of_a_span():
    seen = list(range(100, 160))
    sketch = context_sketch(seen)
    assert sketch.dtype == np.uint64 and np.all(np.diff(sketch.astype(np.float64)) > 0)
    assert changed_grams(seen, sketch) == 0
    assert changed_grams(list(range(500, 560)), sketch) == 57  # every 4-gram new
    assert changed_grams(list(range(500, 530)) + seen, sketch) == 30  # 27 inside the new text, 3 across
    assert changed_grams(seen, None) == 57  # unknown context: all changed
    assert changed_grams([], sketch) == 0 and changed_grams([1, 2], sketch) == 0
