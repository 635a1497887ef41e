"""`python -m relay_server --model default --port 8000`: the same as `relay-llm serve`."""

from __future__ import annotations

import argparse


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="default", help="'default' (gemma-3-270m), an HF folder or a .gguf file")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every request (default: $RELAY_LLM_API_KEY)")
    parser.add_argument("--dtype", default="auto", help="auto (lossless), fast, float32, bfloat16, float16 or int8")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--model-id", default=None, help="the model name served in /v1/models")
    parser.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="generations that may wait beyond the batch; more get a 429 (default 64)")
    parser.add_argument("--store", default=None, metavar="URL",
                        help="share the segment store with other replicas: redis://host:port/db (default: in memory)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = add_serve_arguments(argparse.ArgumentParser(prog="relay_server", description=__doc__)).parse_args(argv)
    from .app import serve

    serve(args.model, host=args.host, port=args.port, api_key=args.api_key, dtype=args.dtype,
          device=args.device, model_id=args.model_id, max_batch=args.max_batch, max_queue=args.max_queue,
          store_url=args.store)


if __name__ == "__main__":
    main()
