"""Fact relay: a seeded log of many similar records; agent 1 reports on it, agent 2 answers from the report.

Agent 1 (a dispatcher) reads a log of ~`records` near-identical parcel records and writes a report. Agent
2, under another system prompt and after unrelated policy text, gets the report pasted in and answers one
question about one record. The question is chosen after agent 1 has written (`pick_question`): a record
whose courier and code both appear verbatim in the report (the last such), so the answer is in the text agent 2 relays
(the item says when no record survived intact and the question falls back to the log).
"""

from __future__ import annotations

import random
import re

FIRST = ["Nadia", "Tomas", "Priya", "Jonas", "Leila", "Marco", "Aiko", "Felix", "Sofia", "Omar", "Greta", "Ivan",
         "Chloe", "Ravi", "Elena", "Hugo", "Mira", "Pavel", "Lucia", "Kenji", "Amara", "Bruno", "Yara", "Dmitri"]
LAST = ["Okafor", "Lindqvist", "Raman", "Becker", "Haddad", "Rossi", "Tanaka", "Moreau", "Costa", "Farouk", "Novak",
        "Petrov", "Dubois", "Mehta", "Silva", "Klein", "Ortega", "Sato", "Weber", "Nowak", "Mensah", "Lopez"]
CITIES = ["Lisbon", "Porto", "Lyon", "Ghent", "Turin", "Malmo", "Split", "Cork", "Graz", "Bilbao", "Brno", "Leeds"]
POLICY = (
    "Customer support policy. Be polite and brief. Never promise a delivery date that the records do not "
    "state. If a customer asks about a parcel, find the courier in the report and quote the parcel code "
    "exactly as written, with its letter. Refunds are handled by the billing team, not by support. "
    "Parcels that are not collected within fourteen days return to the depot they came from."
)
DISPATCHER = "You are a dispatcher. Restate the parcel log as a report, one line per record, keeping every code."
SUPPORT = "You are a customer support agent. Answer with the parcel code only."


def make_items(n: int, seed: int = 1, records: int = 24) -> list[dict]:
    """n fact-relay items, each a log of `records` distinct records (courier, city, code)."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        names = rng.sample([f"{a} {b}" for a in FIRST for b in LAST], records)
        recs = [{"courier": name, "city": rng.choice(CITIES),
                 "code": f"{rng.randint(1000, 9999)}-{rng.choice('ABCDEFGHJKLMNPRSTUVWXYZ')}"} for name in names]
        items.append({"id": f"facts-{i:03d}", "records": recs})
    return items


def log_text(item: dict) -> str:
    return "\n".join(f"Record {j + 1}: courier {r['courier']}, depot {r['city']}, parcel code {r['code']}."
                     for j, r in enumerate(item["records"]))


def agent1_messages(item: dict) -> list[dict]:
    return [{"role": "system", "content": DISPATCHER},
            {"role": "user", "content": f"Parcel log:\n{log_text(item)}\n\nWrite the report."}]


def pick_question(item: dict, report: str) -> dict:
    """The record agent 2 is asked about: the last whose courier and code both appear in `report` (the one furthest
    into the relayed text); else the log's middle record (`in_report` False)."""
    for r in reversed(item["records"]):
        if r["courier"] in report and re.search(rf"\b{re.escape(r['code'])}\b", report):
            return {**r, "in_report": True}
    return {**item["records"][len(item["records"]) // 2], "in_report": False}


def agent2_messages(report: str, record: dict) -> list[dict]:
    question = f"What is the parcel code of courier {record['courier']}?"
    return [{"role": "system", "content": SUPPORT},
            {"role": "user", "content": f"{POLICY}\n\nDispatcher's report:\n{report}\n\nQuestion: {question}"}]
