"""`relay-llm demo`: an Architect -> Developer -> Reviewer pipeline, run with full prefill and with reuse.

Each agent is one call with its own system prompt, few-shot turns and a user message built from a
plain format string that pastes in the earlier agents' outputs, as an agent framework would; the
messages reach the model through its chat template, or as a plain transcript for base models.

The pipeline runs twice on the same prompts: once with the `full` schedule (the reference outputs)
and once with a reuse schedule. Per agent the demo reports what was reused, the TTFT under both
schedules and how long the two outputs stay identical.
"""

from __future__ import annotations

import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import TextIO

from .engine import RelayEngine
from .templates import CHATML_TEMPLATE, GEMMA_TEMPLATE

# ---- the pipeline ------------------------------------------------------------------------------

# Defaults of `relay-llm demo`: about two minutes on 2 CPU cores (decode ~7 tokens/s), and a seed
# whose texts read well with the sampling settings below.
DEFAULT_MAX_NEW_TOKENS = 96
DEFAULT_SEED = 1
DEFAULT_REPEATS = 5  # TTFT timings per agent and schedule

TASK = ("a command-line to-do list. The user types add TEXT to add a task, list to see all tasks with "
        "their numbers, and done N to mark task N as done. The tasks are saved in tasks.json.")


@dataclass(frozen=True)
class Agent:
    """One step of the pipeline.

    key: the name its output goes by in later templates. template: a `str.format` string over
    `task` and the keys of earlier agents. examples: few-shot (template fields, assistant answer)
    turns put before the real user message, whose user half is formatted with the same template.
    stop: stop strings of its call.
    """

    name: str
    key: str
    system: str
    template: str
    examples: tuple[tuple[dict, str], ...] = ()
    stop: tuple[str, ...] = ()


# Few-shot material. A base model copies a lone example almost verbatim when it is close to the task,
# so the Architect sees two of different shape. The review restates each requirement with a verdict:
# copying from the specification just above keeps it on topic.
_TASK_1 = "a function that counts the words in a text file."
_SPEC_1 = """1. The function is called count_words(path) and takes the path of a text file.
2. It reads the whole file as UTF-8 text.
3. It splits the text on whitespace and returns the number of words.
4. It raises FileNotFoundError if the file does not exist."""
_TASK_2 = ("a command-line temperature converter. The user types c2f N or f2c N and sees the converted "
           "value; any other command shows how to use it.")
_SPEC_2 = """1. The program is called convert.py and reads its command from sys.argv.
2. "convert.py c2f N" prints N degrees Celsius in Fahrenheit.
3. "convert.py f2c N" prints N degrees Fahrenheit in Celsius.
4. Any other command prints a usage message."""
_CODE_2 = """import sys


def main():
    command, value = sys.argv[1], float(sys.argv[2])
    if command == "c2f":
        print(value * 9 / 5 + 32)
    elif command == "f2c":
        print((value - 32) * 5 / 9)


main()"""
_REVIEW_2 = """1. The program is called convert.py and reads its command from sys.argv: done.
2. "convert.py c2f N" prints N degrees Celsius in Fahrenheit: done.
3. "convert.py f2c N" prints N degrees Fahrenheit in Celsius: done.
4. Any other command prints a usage message: missing, there is no else branch.
Verdict: changes needed."""

# Each user template ends with the header of the answer, so that in a plain transcript the model's
# continuation is the answer itself; each answer ends where a blank line starts the next record.
AGENTS: tuple[Agent, ...] = (
    Agent(
        name="Architect",
        key="spec",
        system="You are the Architect of a small software team. You turn a task into a short, numbered "
        "specification.",
        template="Task: {task}\nSpecification:",
        examples=(({"task": _TASK_1}, _SPEC_1), ({"task": _TASK_2}, _SPEC_2)),
        stop=("\n\n", "\nTask:"),
    ),
    Agent(
        name="Developer",
        key="code",
        system="You are the Developer of a small software team. You write the Python code that implements "
        "a specification.",
        template="Specification:\n{spec}\nPython code:",
        examples=(({"spec": _SPEC_2}, _CODE_2),),
        stop=("\nSpecification:", "\nTask:", "\n\n\n\n"),
    ),
    Agent(
        name="Reviewer",
        key="review",
        system="You are the Reviewer of a small software team. You check the code against each requirement "
        "of its specification.",
        template="Specification:\n{spec}\nCode:\n{code}\nReview:",
        examples=(({"spec": _SPEC_2, "code": _CODE_2}, _REVIEW_2),),
        stop=("\n\n", "\nReview:", "\nSpecification:"),
    ),
)


def render_plain(messages: list[dict]) -> str:
    """A plain transcript for base models, which never learned chat turn tokens.

    System prompt, then each user message on its own line(s) directly followed by the assistant's
    answer; a blank line closes each answer. Ends right after the last user message.
    """
    parts = []
    for m in messages:
        parts.append(m["content"] + ("\n" if m["role"] == "user" else "\n\n"))
    return "".join(parts)


@dataclass(frozen=True)
class Sampling:
    """Sampling settings shared by every call; agent i samples with seed + i in both runs."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    seed: int = DEFAULT_SEED


def build_messages(agent: Agent, task: str, outputs: dict[str, str]) -> list[dict]:
    """The chat messages of `agent`: system prompt, few-shot turns, then the templated user message."""
    messages = [{"role": "system", "content": agent.system}]
    for fields, answer in agent.examples:
        messages.append({"role": "user", "content": agent.template.format(**fields)})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": agent.template.format(task=task, **outputs)})
    return messages


# ---- results -----------------------------------------------------------------------------------


@dataclass
class Call:
    """One agent's call in one run."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    reused_tokens: int
    prefix_hit_tokens: int
    span_tokens: int
    reuse_rate: float
    ttft_s: float
    total_s: float
    span_kinds: dict[str, int] = field(default_factory=dict)  # span tokens by source: "decode", "prefill"

    @property
    def decode_ms_per_token(self) -> float:
        """Wall time after the first token, per later token, in ms."""
        return 1000 * (self.total_s - self.ttft_s) / max(1, len(self.token_ids) - 1)

    @property
    def output_span_tokens(self) -> int:
        """Prompt tokens found in stored generated outputs (as opposed to stored prompt text)."""
        return self.span_kinds.get("decode", 0)


@dataclass
class AgentRow:
    """One line of the demo table: an agent's full-prefill call next to its reuse call.

    ttft_full_s / ttft_reuse_s: best time to first token of the agent's prompt under each schedule,
    timed back to back in the reuse run's state (see `time_ttft`); the calls' own TTFTs are in full/reuse.
    """

    agent: str
    full: Call
    reuse: Call
    ttft_full_s: float
    ttft_reuse_s: float
    replayed: bool = False  # the reuse run re-generated this output with full prefill (see run_demo)

    @property
    def speedup(self) -> float:
        return self.ttft_full_s / self.ttft_reuse_s if self.ttft_reuse_s > 0 else float("inf")

    @property
    def agree_tokens(self) -> int:
        """Leading output tokens the reuse run shares with the full run."""
        n = 0
        for a, b in zip(self.full.token_ids, self.reuse.token_ids, strict=False):
            if a != b:
                break
            n += 1
        return n


@dataclass
class DemoResult:
    """Everything `run_demo` measured: one row per agent, and the settings of the run."""

    rows: list[AgentRow]
    schedule: str
    template: str
    max_new_tokens: int
    sampling: Sampling
    repeats: int
    wall_s: float = 0.0


# ---- progress ----------------------------------------------------------------------------------


class Progress:
    """Status lines on a stream (stderr): a live token counter on a terminal, one line per call otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._label = ""

    def start(self, label: str) -> None:
        self._label = label
        if self.live:
            self._write(f"\r\033[K{label} ...")

    def tick(self, tokens: int, total: int) -> None:
        if self.live:
            self._write(f"\r\033[K{self._label} ... {tokens}/{total} tokens")

    def done(self, summary: str) -> None:
        if self.enabled:
            self._write(("\r\033[K" if self.live else "") + f"{self._label}: {summary}\n")

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


# ---- running -----------------------------------------------------------------------------------


def _call(engine: RelayEngine, request: list[dict] | str, schedule: str, max_new_tokens: int, seed: int,
          stop: tuple[str, ...], sampling: Sampling, progress: Progress) -> Call:
    """One streamed call (chat messages or a rendered prompt), reporting progress."""
    t0 = time.perf_counter()
    parts: list[str] = []
    last = None
    for chunk in engine.stream(request, max_new_tokens=max_new_tokens, temperature=sampling.temperature,
                               top_p=sampling.top_p, top_k=sampling.top_k, seed=seed, stop=list(stop),
                               schedule=schedule):
        parts.append(chunk.text)
        last = chunk
        progress.tick(len(parts), max_new_tokens)  # about one text chunk per generated token
    assert last is not None and last.stats is not None and last.token_ids is not None
    s = last.stats
    return Call(
        text="".join(parts), token_ids=list(last.token_ids), finish_reason=last.finish_reason or "length",
        prompt_tokens=s.prompt_tokens, reused_tokens=s.reused_tokens, prefix_hit_tokens=s.prefix_hit_tokens,
        span_tokens=s.span_tokens, reuse_rate=s.reuse_rate, ttft_s=s.ttft_s, total_s=time.perf_counter() - t0,
        span_kinds=dict(s.span_kinds),
    )


def resolve_template(engine: RelayEngine, template: str) -> str:
    """"plain" or "chat"; "auto" is plain when the model ships no chat template (a base model)."""
    if template == "auto":
        return "plain" if engine.tokenizer.chat_template in (GEMMA_TEMPLATE, CHATML_TEMPLATE) else "chat"
    if template not in ("plain", "chat"):
        raise ValueError(f"template must be auto, plain or chat, got {template!r}")
    return template


def make_request(messages: list[dict], template: str) -> list[dict] | str:
    """What the engine is given: the messages (rendered by its chat template) or a plain transcript."""
    return render_plain(messages) if template == "plain" else messages


def reset(engine: RelayEngine) -> None:
    """Forget every stored output and cached prefix."""
    engine.store.clear()
    engine.prefix_cache.clear()


def time_ttft(engine: RelayEngine, request: list[dict] | str, schedules: tuple[str, ...], first_id: int,
              repeats: int) -> dict[str, float]:
    """Best of `repeats` timings, per schedule, of request to first-token logits of `request` (s).

    Uses `teacher_force` on one token, which prefills exactly as a chat call does but stores nothing,
    so the samples leave the store and prefix cache as they were. Schedules alternate, in reversed
    order every other round, so a change in machine load hits all of them alike; the minimum is
    kept because other processes on a shared CPU only ever add time.
    """
    samples: dict[str, list[float]] = {s: [] for s in schedules}
    for r in range(repeats):
        for name in schedules if r % 2 == 0 else schedules[::-1]:
            t0 = time.perf_counter()
            engine.teacher_force(request, [first_id], schedule=name)
            samples[name].append(time.perf_counter() - t0)
    return {name: min(v) for name, v in samples.items()}


def run_demo(engine: RelayEngine, schedule: str = "naive", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             repeats: int = DEFAULT_REPEATS, sampling: Sampling | None = None, template: str = "auto",
             task: str = TASK, agents: tuple[Agent, ...] = AGENTS,
             progress: Progress | None = None) -> DemoResult:
    """Run the pipeline with the `full` schedule, then with `schedule`, on identical prompts.

    Full run: each agent's prompt pastes in the outputs the earlier agents produced in this run; these
    are the reference outputs. Reuse run (store and prefix cache cleared first): every agent gets the
    same prompt as in the full run, so the upstream text it quotes must be in the store, generated in
    this run. An agent's reuse call stores its own output; when that output differs from the full
    run's (sampling diverged), the agent is replayed with full prefill and the same seed, which
    re-generates exactly the full run's text and stores its K/V. Before each reuse call, the agent's
    TTFT is timed `repeats` times under both schedules, interleaved, in that same state.
    template: how messages reach the model (`resolve_template`).
    """
    if schedule == "full":
        raise ValueError("the reuse schedule must not be 'full': it is what the demo compares against")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sampling = sampling or Sampling()
    template = resolve_template(engine, template)
    progress = progress or Progress(enabled=False)
    t_start = time.perf_counter()

    # Warm-up: the first forward passes of a process pay one-off costs; neither schedule should.
    reset(engine)
    progress.start("warm-up")
    warm = make_request(build_messages(agents[0], task, {}), template)
    for _ in engine.stream(warm, max_new_tokens=2, schedule="full"):
        pass
    engine.teacher_force(warm, [0], schedule=schedule)
    progress.done(f"{time.perf_counter() - t_start:.1f} s")
    reset(engine)

    full: list[Call] = []
    outputs: dict[str, str] = {}
    for i, agent in enumerate(agents):
        progress.start(f"[full   {i + 1}/{len(agents)}] {agent.name}")
        request = make_request(build_messages(agent, task, outputs), template)
        call = _call(engine, request, "full", max_new_tokens, sampling.seed + i, agent.stop, sampling,
                     progress)
        progress.done(f"{len(call.token_ids)} tokens in {call.total_s:.1f} s")
        full.append(call)
        outputs[agent.key] = call.text

    reset(engine)
    rows: list[AgentRow] = []
    upstream: dict[str, str] = {}
    for i, agent in enumerate(agents):
        request = make_request(build_messages(agent, task, upstream), template)
        label = f"[{schedule:<6} {i + 1}/{len(agents)}] {agent.name}"
        progress.start(label + ": timing TTFT")
        ttft = time_ttft(engine, request, ("full", schedule), full[i].token_ids[0], repeats)
        progress.start(label)
        call = _call(engine, request, schedule, max_new_tokens, sampling.seed + i, agent.stop, sampling,
                     progress)
        progress.done(f"{len(call.token_ids)} tokens in {call.total_s:.1f} s; reused {call.reused_tokens}"
                      f"/{call.prompt_tokens} prompt tokens; TTFT full {ttft['full']:.2f} s, {schedule} "
                      f"{ttft[schedule]:.2f} s")
        if call.prompt_tokens != full[i].prompt_tokens:
            raise RuntimeError(f"{agent.name}: prompts differ between runs ({full[i].prompt_tokens} vs "
                               f"{call.prompt_tokens} tokens)")
        row = AgentRow(agent.name, full[i], call, ttft["full"], ttft[schedule])
        if i + 1 < len(agents) and call.token_ids != full[i].token_ids:
            progress.start(f"[replay {i + 1}/{len(agents)}] {agent.name}")
            replay = _call(engine, request, "full", max_new_tokens, sampling.seed + i, agent.stop, sampling,
                           progress)
            row.replayed = True
            if replay.token_ids == full[i].token_ids:
                progress.done("same output as the full run, now in the store")
            else:  # only if full prefill is not deterministic here; later agents then reuse less
                progress.done("WARNING: not the full run's output; the next agents will find less to reuse")
        rows.append(row)
        upstream[agent.key] = full[i].text
    wall = time.perf_counter() - t_start
    return DemoResult(rows, schedule, template, max_new_tokens, sampling, repeats, wall)


# ---- reporting ---------------------------------------------------------------------------------


def format_table(result: DemoResult) -> str:
    """The per-agent table, then a pipeline total: prompt / reused tokens, TTFT of both runs, speed-up, each
    call's wall time (TTFT + decode) in both runs, the reuse call's decode ms per token, output agreement."""
    head = ("agent", "prompt tok", "reused tok", "from outputs", "TTFT full", f"TTFT {result.schedule}",
            "speed-up", "wall full", f"wall {result.schedule}", "decode ms/tok", "same first tokens")
    lines = []
    for r in result.rows:
        lines.append((
            r.agent, str(r.reuse.prompt_tokens), str(r.reuse.reused_tokens), str(r.reuse.output_span_tokens),
            f"{r.ttft_full_s:.3f} s", f"{r.ttft_reuse_s:.3f} s", f"{r.speedup:.2f}x", f"{r.full.total_s:.1f} s",
            f"{r.reuse.total_s:.1f} s", f"{r.reuse.decode_ms_per_token:.0f}",
            f"{r.agree_tokens}/{len(r.full.token_ids)}",
        ))
    rows = result.rows
    ttft_full, ttft_reuse = sum(r.ttft_full_s for r in rows), sum(r.ttft_reuse_s for r in rows)
    generated = sum(len(r.reuse.token_ids) for r in rows)
    decode_s = sum(r.reuse.total_s - r.reuse.ttft_s for r in rows)
    total = ("pipeline", str(sum(r.reuse.prompt_tokens for r in rows)), str(sum(r.reuse.reused_tokens for r in rows)),
             str(sum(r.reuse.output_span_tokens for r in rows)), f"{ttft_full:.3f} s", f"{ttft_reuse:.3f} s",
             f"{ttft_full / ttft_reuse:.2f}x" if ttft_reuse > 0 else "-", f"{sum(r.full.total_s for r in rows):.1f} s",
             f"{sum(r.reuse.total_s for r in rows):.1f} s", f"{1000 * decode_s / max(1, generated):.0f}", "")
    widths = [max(len(row[c]) for row in (head, *lines, total)) for c in range(len(head))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in
                         enumerate(zip(row, widths, strict=True)))

    rule = "-" * len(fmt(head))
    return "\n".join([fmt(head), rule, *map(fmt, lines), rule, fmt(total)])


def where_time_goes(result: DemoResult) -> str:
    """One line: how the reuse run's wall time splits into prefill (TTFT) and decode."""
    rows = result.rows
    wall = sum(r.reuse.total_s for r in rows)
    ttft = sum(r.reuse.ttft_s for r in rows)
    if wall <= 0:
        return ""
    return (f"Where the time goes ({result.schedule} run): {wall:.1f} s of calls = {ttft:.1f} s to first tokens "
            f"({100 * ttft / wall:.0f} %) + {wall - ttft:.1f} s decoding ({100 * (wall - ttft) / wall:.0f} %).")


def explain(result: DemoResult) -> str:
    """What makes the comparison fair, printed under the table."""
    s = result.sampling
    replayed = ", ".join(r.agent for r in result.rows if r.replayed) or "none needed"
    notes = [
        "Wall: each call's time from request to last token (TTFT + decode); decode ms/tok: the reuse "
        "call's wall time after its first token, per later token. The pipeline row sums the agents.",
        "Same prompts: in both runs every agent's prompt quotes the full run's upstream outputs through "
        "the same templates (prompt token counts are checked equal).",
        "Reuse comes only from the reuse run: it starts with an empty store and prefix cache. An output "
        "it sampled differently from the full run was generated again with full prefill and the same "
        f"seed before the next agent, so the store holds the text that agent quotes (replayed: {replayed}).",
        f"TTFT: best of {result.repeats} request-to-first-token-logits timings per schedule, taken back "
        f"to back and alternating full / {result.schedule} on the same prompt in the same store state "
        "(they store nothing), after a warm-up. On a shared CPU other processes add time at random: "
        "read small differences as noise.",
        "Reused tok: prompt tokens whose stored K/V was used instead of computing them: prefix-cache "
        "hits, text seen in an earlier prompt of the run (such as shared few-shot examples) and earlier "
        "outputs; from outputs: the tokens found in earlier agents' generated outputs.",
        f"Same first tokens: how long the {result.schedule} output stays identical to the full run's, "
        f"both sampled with temperature {s.temperature}, top_p {s.top_p}, top_k {s.top_k} and seed "
        f"{s.seed} + agent index. Reuse moves the logits slightly and one changed sample changes the rest "
        "of the text, so this is a fidelity signal; the Architect quotes nothing and should match in full.",
    ]
    return "\n".join(textwrap.fill(n, width=100, initial_indent="- ", subsequent_indent="  ") for n in notes)


def format_outputs(result: DemoResult) -> str:
    """The full run's output of every agent, indented under its name."""
    blocks = []
    for row in result.rows:
        body = textwrap.indent(row.full.text.strip() or "(empty)", "    ")
        blocks.append(f"== {row.agent} ({len(row.full.token_ids)} tokens, {row.full.finish_reason})\n{body}")
    return "\n\n".join(blocks)


def main(model: str = "default", dtype: str = "auto", schedule: str | None = None,
         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, seed: int = DEFAULT_SEED,
         repeats: int = DEFAULT_REPEATS, template: str = "auto", quiet: bool = False,
         out: TextIO | None = None) -> int:
    """Load the model, run the demo, print the agents' outputs, the table and the notes; exit code."""
    out = out if out is not None else sys.stdout
    progress = Progress(enabled=not quiet)
    progress.start(f"loading {model!r}")
    t0 = time.perf_counter()
    engine = RelayEngine.load(model, dtype=dtype)
    progress.done(f"{engine.executor.dtype}, {engine.kernels.describe()}, {time.perf_counter() - t0:.1f} s")
    try:
        result = run_demo(engine, schedule=schedule or engine.default_schedule, max_new_tokens=max_new_tokens,
                          repeats=repeats, sampling=Sampling(seed=seed), template=template, progress=progress)
    finally:
        engine.close()
    print(format_outputs(result), file=out)
    print(file=out)
    print(f"Architect -> Developer -> Reviewer on {model!r} ({result.template} prompts, at most "
          f"{max_new_tokens} new tokens per agent): full prefill vs {result.schedule!r} reuse", file=out)
    print(format_table(result), file=out)
    print(where_time_goes(result), file=out)
    print(explain(result), file=out)
    print(f"(demo took {result.wall_s:.0f} s)", file=out)
    return 0
