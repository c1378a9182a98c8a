"""python -P -m baton.backends.gateway --triton HOST:GRPC_PORT [--port 9000] [--model DIR] [--model-name NAME]
[--lora NAME ...]"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from ..cli import port_arg

    ap = argparse.ArgumentParser(prog="baton gateway", description="An OpenAI-compatible API over a node's llm model.")
    ap.add_argument("--triton", default="127.0.0.1:8001", help="the node's gRPC address")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=port_arg, default=9000)
    ap.add_argument("--model", default=None, help="the served checkpoint: its tokenizer names logprob tokens")
    ap.add_argument("--model-name", default=None, help="the name clients pass as `model` (default: --model's folder name)")
    ap.add_argument("--lora", action="append", default=[], metavar="NAME",
                    help="a LoRA adapter the node serves: clients pass its name as `model` (repeatable)")
    a = ap.parse_args(argv)
    import uvicorn

    from ..runtime import configure_process
    from .app import Gateway, create_app

    configure_process()
    tokenizer = None
    if a.model and (Path(a.model) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    name = a.model_name or (Path(a.model).resolve().name if a.model else "llm")
    uvicorn.run(create_app(Gateway(a.triton, name, tokenizer, a.lora)), host=a.host, port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
