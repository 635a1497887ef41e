"""A two-agent pipeline written only against the `openai` client, talking to `relay-llm serve`.

The reviewer's prompt pastes the architect's answer; the server recognises that text as its own
earlier output and reuses its K/V. The usage it reports says how many prompt tokens were reused.

    relay-llm serve --model default &          # in another terminal
    python examples/openai_client.py           # or --base-url http://host:port/v1 --model NAME
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default=os.environ.get("RELAY_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--api-key", default=os.environ.get("RELAY_LLM_API_KEY", "unused"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    task = "a command-line tool that counts the words in a text file"
    architect = client.chat.completions.create(
        model=args.model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "system", "content": "You are the architect of a small software team."},
                  {"role": "user", "content": f"Write a short specification for {task}."}])
    spec = architect.choices[0].message.content
    reviewer = client.chat.completions.create(
        model=args.model, max_tokens=args.max_tokens, temperature=0,
        messages=[{"role": "system", "content": "You are the reviewer of a small software team."},
                  {"role": "user", "content": f"Here is the specification:\n\n{spec}\n\nList its weak points."}])

    for name, res in (("architect", architect), ("reviewer", reviewer)):
        usage, relay = res.usage, (res.model_extra or {}).get("relay", {})
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        print(f"--- {name}: {usage.prompt_tokens} prompt tokens, {cached} cached (reused), "
              f"TTFT {relay.get('ttft_s', 0.0):.3f} s, schedule {relay.get('schedule')}")
        print(res.choices[0].message.content.strip(), "\n")


if __name__ == "__main__":
    main()
