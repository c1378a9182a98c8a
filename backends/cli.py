"""`baton` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(argv: list[str]) -> None:
    from baton import LLMEngine, SamplingParams

    ap = argparse.ArgumentParser(prog="baton generate", description="Run the engine in-process on a prompt.")
    ap.add_argument("prompt", nargs="?", default=None)
    ap.add_argument("--model", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--interactive", action="store_true", help="then keep reading prompts from stdin")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    engine = LLMEngine(a.model, dtype=a.dtype)
    print(f"[baton] loaded {a.model} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed)

    def run(prompt: str) -> None:
        seq = engine.add_request(prompt, params)
        shown, t = "", time.perf_counter()
        if a.stream:
            print(prompt, end="", flush=True)
        while engine.has_unfinished():
            engine.step()
            text = engine.tokenizer.decode(seq.output_token_ids)
            # print only complete characters: a partial UTF-8 sequence decodes to U+FFFD
            if a.stream and not text.endswith("\ufffd") and len(text) > len(shown):
                print(text[len(shown):], end="", flush=True)
                shown = text
        if not a.stream:
            print(prompt + engine.tokenizer.decode(seq.output_token_ids))
        dt = time.perf_counter() - t
        print(f"\n[baton] {seq.num_output_tokens} tokens in {dt:.2f}s ({seq.finish_reason})", file=sys.stderr)

    try:
        if a.prompt:
            run(a.prompt)
        while a.interactive:   # ends at EOF (Ctrl-D, or no stdin at all)
            try:
                line = input("prompt> ")
            except EOFError:
                break
            if line.strip():
                run(line)
    except KeyboardInterrupt:
        pass
    finally:
        engine.close()


COMMANDS = {
    "make-checkpoint": lambda argv: __import__("baton.backends.tools.make_checkpoint", fromlist=["main"]).main(argv),
    "generate": _generate,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: baton {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        raise SystemExit(2)
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
