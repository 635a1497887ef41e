"""A LangGraph multi-agent pipeline on ChatRelayLLM: Architect -> Developer -> three Reviewers in parallel
(correctness, style, tests) -> (revise once) -> done.

Each agent is its own ChatRelayLLM instance; they name the same model, so they share one engine and
its cache. The prompt templates paste earlier agents' outputs into later prompts, as a LangChain
user would write them. relay-llm recognises that pasted text and reuses the K/V it kept while
generating it, instead of prefilling it again. The reviewers are a LangGraph fan-out: their calls run
at once and the engine batches them, so the step takes about as long as one review. The report compares
the last fan-out's wall time with the same three reviews run one after another.

    python examples/langgraph_pipeline.py                  # reuse (the engine's default schedule)
    python examples/langgraph_pipeline.py --schedule full  # the same graph without reuse
"""

from __future__ import annotations

import argparse
import operator
import time
from typing import Annotated, Any, TypedDict

from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_relay import ChatRelayLLM
from langgraph.graph import END, START, StateGraph

TEAM = "You are one agent of a small software team. Answer briefly and concretely."

ARCHITECT = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the architect."),
    ("human", "Task: {task}\n\nWrite a short technical specification for this task."),
])
DEVELOPER = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the developer."),
    ("human", "Task: {task}\n\nSpecification from the architect:\n{spec}\n\n"
              "Write the Python code that implements the specification."),
])
REVIEWER = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the reviewer."),
    ("human", "Specification:\n{spec}\n\nCode:\n{code}\n\nReview the code against the specification for "
              "{focus}. List concrete problems."),
])
FOCUS = {"correctness": "correctness", "style": "readability and style", "tests": "missing tests"}
REVISER = ChatPromptTemplate.from_messages([
    ("system", TEAM + " You are the developer."),
    ("human", "Specification:\n{spec}\n\nYour code:\n{code}\n\nReview:\n{review}\n\n"
              "Rewrite the code so that it fixes every problem in the review."),
])


class State(TypedDict, total=False):
    task: str
    spec: str
    code: str
    review: str
    reviews: Annotated[list[str], operator.add]  # the fan-out's reviews, appended in parallel
    revisions: int
    runs: Annotated[list[dict], operator.add]  # one record per agent call


def record(agent: str, msg: AIMessage, start: float) -> dict[str, Any]:
    """What one agent call cost and reused, from the message's usage and response metadata; start and end
    are `time.perf_counter()` readings around the call."""
    stats = msg.response_metadata["relay"]
    usage = msg.usage_metadata or {}
    return {"agent": agent, "start": start, "end": time.perf_counter(), "ttft_s": stats["ttft_s"],
            "prompt_tokens": usage.get("input_tokens", 0),
            "reused_tokens": usage.get("input_token_details", {}).get("cache_read", 0),
            "span_tokens": stats["span_tokens"], "reuse_rate": stats["reuse_rate"],
            "output_tokens": usage.get("output_tokens", 0), "schedule": stats["schedule"]}


def build_graph(model: str = "default", max_tokens: int = 96, schedule: str | None = None, revisions: int = 1):
    """The compiled graph: five agents, five ChatRelayLLM instances on one shared engine."""
    params = {"model": model, "max_tokens": max_tokens, "temperature": 0, "schedule": schedule}
    architect_llm, developer_llm = ChatRelayLLM(**params), ChatRelayLLM(**params)

    def architect(state: State) -> State:
        t = time.perf_counter()
        msg = (ARCHITECT | architect_llm).invoke(state)
        return {"spec": msg.content, "revisions": 0, "runs": [record("architect", msg, t)]}

    def developer(state: State) -> State:
        t = time.perf_counter()
        if state.get("review"):
            msg = (REVISER | developer_llm).invoke(state)
            return {"code": msg.content, "revisions": state["revisions"] + 1,
                    "runs": [record("developer (revision)", msg, t)]}
        msg = (DEVELOPER | developer_llm).invoke(state)
        return {"code": msg.content, "runs": [record("developer", msg, t)]}

    def reviewer(focus: str):
        llm = ChatRelayLLM(**params)

        def review(state: State) -> State:
            t = time.perf_counter()
            msg = (REVIEWER | llm).invoke({**state, "focus": FOCUS[focus]})
            return {"reviews": [f"{focus}: {msg.content}"], "runs": [record(f"reviewer ({focus})", msg, t)]}
        return review

    def merge(state: State) -> State:
        return {"review": "\n".join(sorted(state["reviews"][-len(FOCUS):]))}

    def after_review(state: State) -> str:
        return "developer" if state["revisions"] < revisions else END

    graph = StateGraph(State)
    graph.add_node("architect", architect)
    graph.add_node("developer", developer)
    for focus in FOCUS:
        graph.add_node(f"review_{focus}", reviewer(focus))
        graph.add_edge("developer", f"review_{focus}")
    graph.add_node("merge", merge)
    graph.add_edge(START, "architect")
    graph.add_edge("architect", "developer")
    graph.add_edge([f"review_{focus}" for focus in FOCUS], "merge")
    graph.add_conditional_edges("merge", after_review, ["developer", END])
    return graph.compile()


def fanout_wall(state: State) -> float:
    """Wall time of the last review fan-out: first reviewer start to last reviewer end."""
    last = [r for r in state["runs"] if r["agent"].startswith("reviewer")][-len(FOCUS):]
    return max(r["end"] for r in last) - min(r["start"] for r in last)


def reviews_in_sequence(state: State, model: str = "default", max_tokens: int = 96,
                        schedule: str | None = None) -> float:
    """Wall time of the last fan-out's three reviews run one after another (on the final spec and code).

    These prompts were seen by the fan-out already, so this run finds them in the cache: if anything, it
    flatters the sequential side."""
    llm = ChatRelayLLM(model=model, max_tokens=max_tokens, temperature=0, schedule=schedule)
    t = time.perf_counter()
    for focus in FOCUS:
        (REVIEWER | llm).invoke({**state, "focus": FOCUS[focus]})
    return time.perf_counter() - t


def run(task: str, model: str = "default", max_tokens: int = 96, schedule: str | None = None,
        revisions: int = 1, warmup: bool = True) -> State:
    """Run the pipeline once and return the final state (with `runs`: one record per agent call)."""
    if warmup:  # first-call overheads (kernels, allocator) should not land on the architect's TTFT
        ChatRelayLLM(model=model, max_tokens=1, schedule="full").invoke("Hi")
    return build_graph(model, max_tokens, schedule, revisions).invoke({"task": task})


def print_report(state: State, show_text: bool = True, sequential_s: float | None = None) -> None:
    if show_text:
        for key in ("spec", "code", "review"):
            print(f"--- {key} ---\n{state.get(key, '').strip()}\n")
    header = f"{'agent':<26}{'TTFT s':>8}{'prompt':>8}{'reused':>8}{'in spans':>10}{'reuse rate':>12}  schedule"
    print(header)
    print("-" * len(header))
    for r in state["runs"]:
        print(f"{r['agent']:<26}{r['ttft_s']:>8.3f}{r['prompt_tokens']:>8}{r['reused_tokens']:>8}"
              f"{r['span_tokens']:>10}{r['reuse_rate']:>12.1%}  {r['schedule']}")
    print(f"{'total TTFT':<26}{sum(r['ttft_s'] for r in state['runs']):>8.3f}")
    parallel = fanout_wall(state)
    line = f"review fan-out ({len(FOCUS)} reviewers at once): {parallel:.2f} s wall"
    if sequential_s is not None:
        line += f"; the same reviews in sequence: {sequential_s:.2f} s ({sequential_s / parallel:.2f}x)"
    print(line)


def main(argv: list[str] | None = None) -> State:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="a function that returns the n-th Fibonacci number, with tests")
    parser.add_argument("--model", default="default", help='"default", a Hugging Face folder or a .gguf file')
    parser.add_argument("--max-tokens", type=int, default=96, help="tokens per agent")
    parser.add_argument("--schedule", default=None, help="prefill schedule; 'full' disables reuse (default: engine's)")
    parser.add_argument("--revisions", type=int, default=1, help="developer revisions after a review")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    parser.add_argument("--no-sequential", action="store_true", help="skip re-running the reviews in sequence")
    args = parser.parse_args(argv)
    state = run(args.task, args.model, args.max_tokens, args.schedule, args.revisions)
    sequential = None if args.no_sequential else reviews_in_sequence(state, args.model, args.max_tokens,
                                                                      args.schedule)
    print_report(state, show_text=not args.quiet, sequential_s=sequential)
    return state


if __name__ == "__main__":
    main()
