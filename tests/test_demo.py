"""`relay-llm demo`: the CLI wiring, the report, and the pipeline end to end on the default model."""

from __future__ import annotations

import io

import pytest

from relay_llm import cli, demo


def _call(ids: list[int], prompt: int, reused: int, ttft: float) -> demo.Call:
    return demo.Call(text="x", token_ids=ids, finish_reason="length", prompt_tokens=prompt,
                     reused_tokens=reused, prefix_hit_tokens=0, span_tokens=reused,
                     reuse_rate=1.0 if reused else 0.0, ttft_s=ttft, total_s=1.0, span_kinds={"decode": 7})


def test_cli_demo_defaults():
    args = cli.build_parser().parse_args(["demo"])
    assert (args.model, args.dtype, args.repeats) == ("default", "auto", demo.DEFAULT_REPEATS)
    assert (args.seed, args.max_new_tokens) == (demo.DEFAULT_SEED, demo.DEFAULT_MAX_NEW_TOKENS)
    assert args.template == "auto" and args.run is not None


@pytest.mark.parametrize("argv", [["demo", "--schedule", "full"], ["demo", "--max-new-tokens", "0"],
                                  ["demo", "--schedule", "nope"], ["demo", "--template", "jinja"]])
def test_cli_demo_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(argv)


def test_table_and_notes():
    rows = [
        demo.AgentRow("Architect", _call([1, 2, 3], 100, 0, 0.2), _call([1, 2, 3], 100, 0, 0.2), 0.2, 0.2),
        demo.AgentRow("Developer", _call([4, 5, 6], 300, 120, 0.6), _call([4, 9, 6], 300, 120, 0.3), 0.6,
                      0.3, replayed=True),
    ]
    result = demo.DemoResult(rows, "naive", "plain", 3, demo.Sampling(), repeats=3)
    assert rows[0].agree_tokens == 3 and rows[1].agree_tokens == 1
    assert rows[1].speedup == pytest.approx(2.0)
    table = demo.format_table(result)
    lines = table.splitlines()
    assert "TTFT naive" in lines[0] and "wall naive" in lines[0] and len(lines) == 2 + len(rows) + 2
    assert "Developer" in lines[3] and "2.00x" in lines[3] and "1/3" in lines[3] and " 7 " in lines[3]
    assert lines[-1].startswith("pipeline") and " 400 " in lines[-1] and "2.0 s" in lines[-1]  # 1.0 s + 1.0 s
    assert "1.00x" not in lines[-1] and "1.60x" in lines[-1]  # TTFT sums: 0.8 s full / 0.5 s naive
    assert "decoding" in demo.where_time_goes(result)
    notes = demo.explain(result)
    assert "replayed: Developer" in notes and all(len(line) <= 100 for line in notes.splitlines())


def test_messages_quote_upstream_outputs():
    outputs = {"spec": "SPEC TEXT", "code": "CODE TEXT"}
    for agent in demo.AGENTS:
        messages = demo.build_messages(agent, demo.TASK, outputs)
        assert messages[0] == {"role": "system", "content": agent.system}
        assert [m["role"] for m in messages[1:]] == ["user", "assistant"] * len(agent.examples) + ["user"]
    reviewer = demo.build_messages(demo.AGENTS[2], demo.TASK, outputs)
    assert "SPEC TEXT" in reviewer[-1]["content"] and "CODE TEXT" in reviewer[-1]["content"]
    plain = demo.render_plain(reviewer)
    assert plain.startswith(demo.AGENTS[2].system + "\n\n") and plain.endswith("CODE TEXT\nReview:\n")
    assert demo.make_request(reviewer, "chat") is reviewer


@pytest.mark.real_model
def test_demo_pipeline_end_to_end(default_engine):
    """Full run then naive run, 24 tokens per agent: enough for stored outputs (>= 16 tokens) to be reused."""
    demo.reset(default_engine)
    try:
        result = demo.run_demo(default_engine, schedule="naive", max_new_tokens=24, repeats=1)
    finally:
        demo.reset(default_engine)
    assert [r.agent for r in result.rows] == [a.name for a in demo.AGENTS]
    for row in result.rows:
        assert row.full.prompt_tokens == row.reuse.prompt_tokens > 0
        assert row.full.reused_tokens == 0
        assert 0 < len(row.full.token_ids) <= 24 and 0 < len(row.reuse.token_ids) <= 24
        assert row.ttft_full_s > 0 and row.ttft_reuse_s > 0
    architect, developer, reviewer = result.rows
    # The Architect quotes nothing: with the same seed the reuse run computes and samples exactly the same.
    assert architect.reuse.span_tokens == 0
    assert architect.agree_tokens == len(architect.full.token_ids)
    # Downstream agents splice the outputs the reuse run stored: the spec; the Reviewer also the code.
    assert developer.reuse.reused_tokens >= developer.reuse.output_span_tokens >= 16
    assert reviewer.reuse.reused_tokens >= reviewer.reuse.output_span_tokens
    assert reviewer.reuse.output_span_tokens >= developer.reuse.output_span_tokens + 16
    out = io.StringIO()
    print(demo.format_table(result), file=out)
    assert all(r.agent in out.getvalue() for r in result.rows)


def test_progress_lines():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    plain, tty = io.StringIO(), Tty()
    for stream in (plain, tty):
        p = demo.Progress(stream)
        p.start("[full 1/3] Architect")
        p.tick(5, 96)
        p.done("67 tokens")
    assert plain.getvalue() == "[full 1/3] Architect: 67 tokens\n"
    assert "5/96 tokens" in tty.getvalue() and tty.getvalue().endswith("Architect: 67 tokens\n")
    quiet = io.StringIO()
    demo.Progress(quiet, enabled=False).done("x")
    assert quiet.getvalue() == ""
