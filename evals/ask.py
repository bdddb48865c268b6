"""Start `compress serve MODEL` on 127.0.0.1, ask it one question with the `openai` client, stop it.

The last step of the README's main job (prune the offline Gemma, serve the result, ask it something):

    python evals/ask.py runs/gemma-270m-80 --prompt "The capital of France is"

Prints the answer and how long start-up and the request took; exits 2 with one line if the server does
not come up (its log is printed) or the `openai` package is missing.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench_serve_online import free_port, start_server  # evals/ is on sys.path when run as a script


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model directory or offline name, as for `compress serve`")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    try:
        import openai
    except ImportError:
        print("ask: error: needs the openai package: pip install openai", file=sys.stderr)
        return 2
    port, t0 = free_port(), time.perf_counter()
    try:
        server = start_server(args.model, port, ["--served-model-name", "model"], timeout=args.startup_timeout)
    except RuntimeError as err:
        print(str(err)[-4000:], file=sys.stderr)
        print(f"ask: error: server for {args.model} did not come up", file=sys.stderr)
        return 2
    try:
        started = time.perf_counter() - t0
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        t1 = time.perf_counter()
        reply = client.completions.create(model="model", prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
        print(f"{args.prompt}{reply.choices[0].text}")
        print(f"(server up in {started:.1f} s; answered in {time.perf_counter() - t1:.1f} s)")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
