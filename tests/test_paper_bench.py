"""The paper reproduction harness (benchmarks/paper): scorers, the pass@1 executor, and a smallest-size run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.paper import coding, execute, facts, notes, scoring  # noqa: E402
from benchmarks.paper.methods import METHODS, kl_stats  # noqa: E402
from benchmarks.paper.records import Records  # noqa: E402

# ---- scorers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [" 4821-K.", "4821-K", " 4821-k, and it left Lisbon", "4821-K\nRecord 3: ..."])
def test_exact_match_accepts_the_answer_with_trailing_text(answer):
    assert scoring.exact_match(answer, "4821-K")


@pytest.mark.parametrize("answer", [" 4821-J.", " 4821", " 4821-KX", "", " The code is 4821-K", " 1482-K"])
def test_exact_match_rejects_wrong_or_partial_answers(answer):
    assert not scoring.exact_match(answer, "4821-K")


def test_wilson_interval_brackets_the_rate():
    lo, hi = scoring.wilson(8, 10)
    assert lo < 0.8 < hi <= 1.0
    assert scoring.wilson(0, 0) == (0.0, 1.0)
    assert scoring.wilson(0, 5)[0] == 0.0


def test_fact_question_is_picked_from_what_the_report_kept():
    item = facts.make_items(1, seed=3, records=8)[0]
    rec = item["records"][5]
    report = f"Record 6: courier {rec['courier']}, depot {rec['city']}, parcel code {rec['code']}."
    q = facts.pick_question(item, report)
    assert q["in_report"] and q["code"] == rec["code"]
    assert not facts.pick_question(item, "nothing useful")["in_report"]


def test_generators_are_seeded_and_large_enough():
    assert facts.make_items(40) == facts.make_items(40)
    assert len({i["id"] for i in notes.make_items(40)}) == 40
    assert [i["agents"] for i in notes.make_items(4)] == [5, 2, 3, 4]
    assert len(coding.make_items(40)) == 40


def test_kl_stats_identical_continuation():
    import torch

    ref = torch.log_softmax(torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]]), -1)
    got = torch.log_softmax(torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 3.0]]), -1)
    s = kl_stats(ref, got)
    assert s["identical"] == 1 and abs(s["top1"] - 2 / 3) < 1e-9 and s["kl_max"] > s["kl_mean"] > 0
    assert kl_stats(ref, ref)["identical"] == 3


def test_records_resume_only_with_the_same_signature(tmp_path):
    Records(tmp_path, {"a": 1}).save("facts", "x", {"v": 2})
    assert Records(tmp_path, {"a": 1}).load("facts", "x")["v"] == 2
    assert Records(tmp_path, {"a": 2}).load("facts", "x") is None


# ---- the pass@1 executor ------------------------------------------------------------------------------


def _problem():
    return coding.make_items(1)[0] | {"problem": {
        "task_id": "Test/0", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"Sum of a and b.\"\"\"\n",
        "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}}


def test_executor_passes_a_correct_solution():
    assert execute.passes(coding.program(_problem(), "    return a + b"))


def test_executor_fails_a_wrong_solution():
    res = execute.run_program(coding.program(_problem(), "    return a - b"))
    assert res["status"] == "failed" and "AssertionError" in res["detail"]
    assert not execute.passes(coding.program(_problem(), "    return a +"))  # a syntax error


def test_executor_times_out_a_looping_program():
    res = execute.run_program(coding.program(_problem(), "    while True:\n        pass"), timeout_s=1.0)
    assert res["status"] == "timeout"


def test_humaneval_canonical_solution_passes_and_cut_stops_at_the_next_def():
    item = coding.make_items(1)[0]
    body = item["problem"]["canonical_solution"]
    assert execute.passes(coding.program(item, coding.cut(body + "\n\ndef extra():\n    pass\n")))


# ---- the whole harness, smallest sizes, on the default model --------------------------------------------


@pytest.mark.real_model
def test_smallest_run_writes_every_table_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.paper.plots import PLOTS
    from benchmarks.paper.presets import smallest
    from benchmarks.paper.run import run

    results = run(smallest(), tmp_path)
    page = (tmp_path / "README.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    for key, table in data["tables"].items():
        assert table["title"] in page
        assert table["rows"], key
        for row in table["rows"]:
            assert set(row) >= set(table["columns"]) - {"note"}, key
        if key != "targets":
            assert set(METHODS) <= {r["method"] for r in table["rows"]}, key
    for name in PLOTS:
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"({name})" in page
    assert results["preset"] == "smallest"
    assert list((tmp_path / "raw" / "smallest" / "facts").glob("*.json"))
    # A second run resumes from the records: nothing is measured again.
    again = run(smallest(), tmp_path)
    assert again["tables"]["q1"]["rows"] == json.loads(json.dumps(results["tables"]["q1"]["rows"]))


def test_cli_has_bench_paper_and_finds_the_checkout():
    from relay_llm import cli

    args = cli.build_parser().parse_args(["bench", "paper", "--preset", "full", "--out", "x"])
    assert (args.bench, args.preset, args.out) == ("paper", "full", "x")
    assert cli._benchmarks_root() == ROOT
