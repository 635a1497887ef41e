"""Chain of notes: 2 to 5 agents (the roles of `benchmarks/decode.py`), each prompt pasting every earlier note.

Agent 1 gets a ticket with a seeded task; agents 2..n get the task and every earlier agent's notes behind
their own system prompt, as an agent framework's prompt template pastes them. After the last agent, a
question prompt pastes all notes and asks for the ticket number, which only agent 1's input held: it
survives only if a note copied it (the item records whether one did). Items cycle through 5, 2, 3, 4 agents
so every preset has a 5-agent chain first.
"""

from __future__ import annotations

import random

from benchmarks.decode import AGENTS

APPS = ["a command-line to-do list", "a URL shortener", "a recipe manager", "a unit converter", "a habit tracker",
        "a bookmark manager", "a quiz game", "an expense tracker", "a password generator", "a weather logger",
        "a flashcard app", "a reading list"]
FEATURES = ["saves its data in a JSON file", "has a command to list every entry", "can delete an entry by number",
            "prints a summary at the end", "validates every input", "supports undo of the last change",
            "exports a CSV file", "sorts entries by date", "has a search command", "counts entries per day"]
LENGTHS = (5, 2, 3, 4)


def make_items(n: int, seed: int = 1, lengths: tuple[int, ...] = LENGTHS) -> list[dict]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        feats = rng.sample(FEATURES, 3)
        task = f"{rng.choice(APPS)} that {feats[0]}, {feats[1]} and {feats[2]}."
        items.append({"id": f"notes-{i:03d}", "task": task, "ticket": f"TK-{rng.randint(1000, 9999)}",
                      "agents": lengths[i % len(lengths)]})
    return items


def _pasted(notes: list[str]) -> list[str]:
    return [f"{AGENTS[j][0]}'s notes:\n{note}" for j, note in enumerate(notes)]


def agent_messages(item: dict, k: int, notes: list[str]) -> list[dict]:
    """Agent k's messages (k = 0 is the first agent, who sees the ticket)."""
    name, system = AGENTS[k]
    head = f"Ticket {item['ticket']}. Task: {item['task']}" if k == 0 else f"Task: {item['task']}"
    parts = [head, *_pasted(notes[:k]), f"Now write your notes as the {name}."]
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n\n".join(parts)}]


QUESTION_SYSTEM = "You are the team's assistant. Answer from the notes."
ANSWER_PREFIX = "The ticket number is"


def question_messages(item: dict, notes: list[str]) -> list[dict]:
    parts = [f"Task: {item['task']}", *_pasted(notes), "Question: What is the ticket number of this task?"]
    return [{"role": "system", "content": QUESTION_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]
