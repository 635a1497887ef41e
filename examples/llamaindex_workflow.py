"""A LlamaIndex Workflow of three agents on RelayLLM: Architect -> Developer -> Reviewer.

Each agent is its own RelayLLM instance; they name the same model, so they share one engine and its
cache. Later agents' prompt templates paste earlier agents' outputs (the developer gets the spec, the
reviewer gets the spec and the code), as a LlamaIndex user would write them. relay-llm recognises
that pasted text and reuses the K/V it kept while generating it, instead of prefilling it again.
The steps are async and call `achat`, which runs the engine off the event loop.

    python examples/llamaindex_workflow.py                  # reuse (the engine's default schedule)
    python examples/llamaindex_workflow.py --schedule full  # the same workflow without reuse
    python examples/llamaindex_workflow.py --compare        # both, on a fresh cache each, side by side
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from llama_index.core.base.llms.types import ChatResponse
from llama_index.core.prompts import ChatPromptTemplate
from llama_index.core.workflow import Context, Event, StartEvent, StopEvent, Workflow, step
from llama_index.llms.relay import RelayLLM

TEAM = "You are one agent of a small software team. Answer briefly and concretely."

ARCHITECT = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the architect."),
    ("user", "Task: {task}\n\nWrite a short technical specification for this task."),
])
DEVELOPER = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the developer."),
    ("user", "Task: {task}\n\nSpecification from the architect:\n{spec}\n\n"
             "Write the Python code that implements the specification."),
])
REVIEWER = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the reviewer."),
    ("user", "Specification:\n{spec}\n\nCode:\n{code}\n\nReview the code against the specification. "
             "List concrete problems."),
])


class SpecEvent(Event):
    task: str
    spec: str


class CodeEvent(Event):
    task: str
    spec: str
    code: str


def record(agent: str, response: ChatResponse) -> dict[str, Any]:
    """What one agent call cost and reused, from the response's relay stats (`response.raw["relay"]`)."""
    stats = response.raw["relay"]
    return {"agent": agent, "ttft_s": stats["ttft_s"], "prompt_tokens": stats["prompt_tokens"],
            "reused_tokens": stats["reused_tokens"], "span_tokens": stats["span_tokens"],
            "reuse_rate": stats["reuse_rate"], "output_tokens": stats["completion_tokens"],
            "schedule": stats["schedule"], "text": response.message.content or ""}


class TeamWorkflow(Workflow):
    """Three agents, three RelayLLM instances on one shared engine; each step records its agent's stats."""

    def __init__(self, model: str = "default", max_tokens: int = 96, schedule: str | None = None, **kwargs: Any):
        super().__init__(timeout=None, **kwargs)
        params = {"model": model, "max_tokens": max_tokens, "temperature": 0, "schedule": schedule}
        self.architect_llm, self.developer_llm, self.reviewer_llm = (RelayLLM(**params) for _ in range(3))

    @step
    async def architect(self, ctx: Context, ev: StartEvent) -> SpecEvent:
        response = await self.architect_llm.achat(ARCHITECT.format_messages(task=ev.task))
        await _log(ctx, record("architect", response))
        return SpecEvent(task=ev.task, spec=response.message.content or "")

    @step
    async def developer(self, ctx: Context, ev: SpecEvent) -> CodeEvent:
        response = await self.developer_llm.achat(DEVELOPER.format_messages(task=ev.task, spec=ev.spec))
        await _log(ctx, record("developer", response))
        return CodeEvent(task=ev.task, spec=ev.spec, code=response.message.content or "")

    @step
    async def reviewer(self, ctx: Context, ev: CodeEvent) -> StopEvent:
        response = await self.reviewer_llm.achat(REVIEWER.format_messages(spec=ev.spec, code=ev.code))
        await _log(ctx, record("reviewer", response))
        return StopEvent(result={"spec": ev.spec, "code": ev.code, "review": response.message.content or "",
                                 "runs": await ctx.store.get("runs")})


async def _log(ctx: Context, run: dict[str, Any]) -> None:
    runs = await ctx.store.get("runs", default=[])
    await ctx.store.set("runs", [*runs, run])


async def run(task: str, model: str = "default", max_tokens: int = 96, schedule: str | None = None,
              warmup: bool = True, fresh_cache: bool = False) -> dict[str, Any]:
    """Run the workflow once; the result holds spec, code, review and `runs` (one record per agent)."""
    if fresh_cache:  # forget earlier outputs and prompts: every run starts cold
        engine = RelayLLM(model=model).engine
        engine.store.clear()
        engine.prefix_cache.clear()
    if warmup:  # first-call overheads (kernels, allocator) should not land on the architect's TTFT
        await RelayLLM(model=model, max_tokens=1, schedule="full").acomplete("Hi")
    return await TeamWorkflow(model, max_tokens, schedule).run(task=task)


def print_report(result: dict[str, Any], show_text: bool = True) -> None:
    if show_text:
        for key in ("spec", "code", "review"):
            print(f"--- {key} ---\n{result[key].strip()}\n")
    header = f"{'agent':<12}{'TTFT s':>8}{'prompt':>8}{'reused':>8}{'in spans':>10}{'reuse rate':>12}  schedule"
    print(header)
    print("-" * len(header))
    for r in result["runs"]:
        print(f"{r['agent']:<12}{r['ttft_s']:>8.3f}{r['prompt_tokens']:>8}{r['reused_tokens']:>8}"
              f"{r['span_tokens']:>10}{r['reuse_rate']:>12.1%}  {r['schedule']}")
    print(f"{'total TTFT':<12}{sum(r['ttft_s'] for r in result['runs']):>8.3f}")


def print_comparison(full: dict[str, Any], relay: dict[str, Any]) -> None:
    header = f"{'agent':<12}{'TTFT full':>10}{'TTFT reuse':>12}{'speed-up':>10}{'reused':>8}"
    print(header)
    print("-" * len(header))
    for f, r in zip(full["runs"], relay["runs"], strict=True):
        print(f"{r['agent']:<12}{f['ttft_s']:>10.3f}{r['ttft_s']:>12.3f}{f['ttft_s'] / max(r['ttft_s'], 1e-9):>9.1f}x"
              f"{r['reused_tokens']:>8}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="a function that returns the n-th Fibonacci number, with tests")
    parser.add_argument("--model", default="default", help='"default", a Hugging Face folder or a .gguf file')
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per agent")
    parser.add_argument("--schedule", default=None, help="prefill schedule; 'full' disables reuse (default: engine's)")
    parser.add_argument("--compare", action="store_true", help="run with 'full' and with --schedule, compare TTFT")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    if not args.compare:
        result = asyncio.run(run(args.task, args.model, args.max_tokens, args.schedule))
        print_report(result, show_text=not args.quiet)
        return result
    full = asyncio.run(run(args.task, args.model, args.max_tokens, "full", fresh_cache=True))
    result = asyncio.run(run(args.task, args.model, args.max_tokens, args.schedule, fresh_cache=True))
    print_report(full, show_text=False)
    print()
    print_report(result, show_text=not args.quiet)
    print()
    print_comparison(full, result)
    return {**result, "full": full}


if __name__ == "__main__":
    main()
