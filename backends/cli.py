"""`baton` command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

from .paths import default_model

# The embedded default model (models/, trained by `baton train-tiny`), package data of baton.
DEFAULT_MODEL = str(default_model())


def _generate(argv: list[str]) -> None:
    from baton import EngineConfig, LLMEngine, SamplingParams

    ap = argparse.ArgumentParser(prog="baton generate", description="Run the engine in-process on a prompt.")
    ap.add_argument("prompt", nargs="?", default=None)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face checkpoint directory (default: baton-tiny)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default=EngineConfig.dtype)
    ap.add_argument("--stream", action="store_true", help="print text as it is generated")
    ap.add_argument("--interactive", action="store_true", help="then keep reading prompts from stdin")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=a.model, dtype=a.dtype))
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


def _json_table(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _lora_module(text: str) -> tuple[str, str]:
    from pathlib import Path

    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    if not Path(path, "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{path!r} has no adapter_config.json (a PEFT LoRA adapter directory)")
    return name, str(Path(path).resolve())


def port_arg(text: str, none_ok: bool = False) -> int:
    """A TCP port (0: a free one; -1: none, where none_ok)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not (-1 if none_ok else 0) <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535{'; -1: none' if none_ok else ''})")
    return port


def gateway_port_arg(text: str) -> int:
    return port_arg(text, none_ok=True)


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < s < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return s


def _serve(argv: list[str]) -> None:
    from pathlib import Path

    from .serving.config import Profile
    from .serving.launcher import Node

    ap = argparse.ArgumentParser(prog="baton serve", description="Serve a model through tritonserver.")
    ap.add_argument("profile", nargs="?", default="single_node", help="ensemble_configs/<profile>.toml")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face checkpoint directory (default: baton-tiny)")
    ap.add_argument("--http-port", type=port_arg, default=8000)
    ap.add_argument("--grpc-port", type=port_arg, default=8001)
    ap.add_argument("--metrics-port", type=port_arg, default=8002)
    ap.add_argument("--gateway-port", type=gateway_port_arg, default=9000, help="the OpenAI-compatible API; -1: none")
    ap.add_argument("--prompt", default=None, help="stream this sample completion once ready")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--smoke", action="store_true",
                    help="stream the sample, check it against the in-process engine, stop, exit 0/1")
    ap.add_argument("--timeout", type=_seconds, default=300)
    ap.add_argument("--listen", default="", help="address Triton and the gateway listen on (default 127.0.0.1; "
                    "a PD node with a non-loopback --host: 0.0.0.0); 0.0.0.0 in a container")
    ap.add_argument("--kv-tiers", default=None, type=_json_table,
                    help='KV cache tiers, replacing the profile\'s [engine.kv_tiers]: JSON, e.g. '
                         '\'{"host_mb": 1024, "store": "auto", "disk_dir": "/var/cache/baton"}\'')
    ap.add_argument("--lora-modules", nargs="+", default=[], type=_lora_module, metavar="NAME=DIR",
                    help="LoRA adapters (PEFT directories) requests may name in `lora` (the OpenAI API: as `model`), "
                         "as vLLM's --lora-modules; in place of the profile's [engine] lora_modules")
    pd = ap.add_argument_group("PD across servers (profiles pd_prefill, pd_decode, pd_router)")
    pd.add_argument("--name-service", default="", help="etcd URL, e.g. http://10.0.0.1:2379")
    pd.add_argument("--host", default="127.0.0.1", help="this node's address as the other nodes reach it")
    pd.add_argument("--cluster-key-file", default="", help="the cluster's shared key (hex), the same file on every node")
    pd.add_argument("--cluster", default="baton", help="the cluster's name in the name service")
    pd.add_argument("--transfer-protocol", default="tcp", choices=["tcp", "rdma"], help="Mooncake transport")
    pd.add_argument("--encode-address", default="", help="EPD (profile epd_llm): the encode server's gRPC host:port "
                    "(without it, the encode servers registered with --name-service)")
    a = ap.parse_args(argv)

    _stop_on_signals()
    role = Profile.load(a.profile).serving.get("pd_role", "")
    gateway = a.gateway_port >= 0 and role in ("", "router")      # only where `llm` is served
    node = Node(a.model, a.profile, a.http_port, a.grpc_port, a.metrics_port,
                gateway_port=a.gateway_port if gateway else None, name_service=a.name_service, host=a.host,
                cluster_key_file=a.cluster_key_file and str(Path(a.cluster_key_file).resolve()),
                cluster=a.cluster, transfer_protocol=a.transfer_protocol, listen=a.listen,
                overrides=({"kv_tiers": a.kv_tiers} if a.kv_tiers else {})
                | ({"encode_address": a.encode_address} if a.encode_address else {})
                | ({"lora_modules": dict(a.lora_modules)} if a.lora_modules else {}))
    exit_code = 0
    try:
        node.start(a.timeout)
        if a.prompt or a.smoke:
            ok = _sample(node, a.prompt or "def fibonacci(n):", a.max_tokens, check=a.smoke, model=a.model)
            if a.smoke:
                raise SystemExit(0 if ok else 1)
        print("[baton] serving; Ctrl-C to stop", file=sys.stderr, flush=True)
        while (failure := node.failure()) is None:
            time.sleep(0.5)
        print(f"[baton] {failure}; stopping the node (its log: {node.run_dir}/tritonserver.log)",
              file=sys.stderr, flush=True)
        exit_code = 1
    except KeyboardInterrupt:                    # SIGTERM or Ctrl-C: finish what is in flight first
        try:                                     # a second signal (anywhere in here) stops at once
            if node.server is not None and node.failure() is None:
                grace = node.serving.drain_timeout_s if node.serving else 0
                print(f"[baton] draining: no new requests; waiting up to {grace:.0f}s for those in flight "
                      "(signal again to stop now)", file=sys.stderr, flush=True)
                drained = node.drain()
                print(f"[baton] {'drained' if drained else 'drain timed out'}", file=sys.stderr, flush=True)
        except KeyboardInterrupt:
            pass
    finally:
        _stop_uninterrupted("[baton] stopping", node.stop)
    raise SystemExit(exit_code)


def _stop_on_signals() -> None:
    """SIGTERM and SIGINT both raise KeyboardInterrupt (the caller drains, then stops). SIGINT is set
    too: a process a non-interactive shell starts in the background (`make serve &`, nohup) inherits
    SIGINT ignored, and Python leaves it so: `kill -INT` would do nothing."""
    import signal

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _stop_uninterrupted(message: str, stop: Callable[[], None]) -> None:
    """Signals are ignored from here: a second Ctrl-C must not cut the cleanup short (it would leave
    processes and /dev/shm files behind)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(message, file=sys.stderr, flush=True)
    stop()


def _sample(node, prompt: str, max_tokens: int, check: bool, model: str) -> bool:  # noqa: ANN001
    from baton_client import BatonClient

    print(f"[baton] sample completion (gRPC stream):\n{prompt}", end="", flush=True)
    ids: list[int] = []
    last = None
    for chunk in BatonClient(node.grpc_url).stream(prompt, max_tokens=max_tokens, temperature=0.0):
        print(chunk.text, end="", flush=True)
        ids += chunk.token_ids
        last = chunk
    print(f"\n[baton] {len(ids)} tokens, finish_reason={last.finish_reason if last else None}", flush=True)
    if not check:
        return True
    from baton import LLM, SamplingParams

    llm = LLM(model, max_model_len=1024, kv_cache_memory_mb=64)
    try:
        expect = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens))[0].token_ids
    finally:
        llm.close()
    ok = bool(ids) and ids == expect and last is not None and last.finish_reason in ("stop", "length")
    print(f"[baton] smoke {'OK' if ok else 'FAILED'}: server tokens {'==' if ids == expect else '!='} in-process engine",
          flush=True)
    return ok


def _client(argv: list[str]) -> None:
    from baton_client import BatonClient, BatonError

    ap = argparse.ArgumentParser(prog="baton client", description="Send a prompt to a Baton server.")
    ap.add_argument("prompt")
    ap.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8001 gRPC / :8000 HTTP)")
    ap.add_argument("--http", action="store_true", help="use HTTP generate_stream (SSE) instead of gRPC")
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None)
    a = ap.parse_args(argv)
    proto = "http" if a.http else "grpc"
    client = BatonClient(a.url or ("127.0.0.1:8000" if a.http else "127.0.0.1:8001"), proto)
    kw = {"max_tokens": a.max_tokens, "temperature": a.temperature, "top_p": a.top_p}
    if a.seed is not None:
        kw["seed"] = a.seed
    try:
        if a.stream:
            last = None
            for chunk in client.stream(a.prompt, stop=a.stop, **kw):
                print(chunk.text, end="", flush=True)
                last = chunk
            print(f"\n[{last.finish_reason}; prompt {last.prompt_tokens}, completion {last.completion_tokens}, "
                  f"cached {last.cached_tokens}]" if last else "", file=sys.stderr)
        else:
            c = client.generate(a.prompt, stop=a.stop, **kw)
            print(c.text)
    except BatonError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def _cluster(argv: list[str]) -> None:
    from .cluster.local import LocalCluster

    ap = argparse.ArgumentParser(prog="baton cluster", description="A PD cluster on this machine: etcd, prefill "
                                 "nodes, decode nodes and a router, each node its own tritonserver.")
    ap.add_argument("action", choices=["up"])
    ap.add_argument("--prefill", type=int, default=1, help="prefill nodes")
    ap.add_argument("--decode", type=int, default=1, help="decode nodes")
    ap.add_argument("--encode", type=int, default=0, help="encode servers (EPD, a vision model): the router sends "
                    "images to them (profile epd_router); 0: prefill nodes encode images themselves")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face checkpoint directory (default: baton-tiny)")
    ap.add_argument("--http-port", type=port_arg, default=8000, help="the router's")
    ap.add_argument("--grpc-port", type=port_arg, default=8001, help="the router's")
    ap.add_argument("--metrics-port", type=port_arg, default=8002, help="the router's")
    ap.add_argument("--gateway-port", type=gateway_port_arg, default=9000, help="the router's OpenAI-compatible API; -1: none")
    ap.add_argument("--hosts", action="store_true", help="each node on a simulated host (network namespaces; root)")
    ap.add_argument("--kv-tiers", default=None, type=_json_table,
                    help='every node\'s KV cache tiers (JSON); "store": "auto" starts one Mooncake Store for the cluster')
    ap.add_argument("--timeout", type=_seconds, default=300)
    a = ap.parse_args(argv)
    if a.prefill < 1 or a.decode < 1 or a.encode < 0:
        ap.error("--prefill and --decode must be at least 1, --encode at least 0")

    _stop_on_signals()
    cluster = LocalCluster(a.model, a.prefill, a.decode, hosts=a.hosts,
                           router_ports=(a.http_port, a.grpc_port, a.metrics_port, a.gateway_port),
                           kv_tiers=a.kv_tiers or None, encode=a.encode)
    try:
        encode = f"{a.encode} encode, " if a.encode else ""
        print(f"[baton] starting etcd, {encode}{a.prefill} prefill and {a.decode} decode nodes, a router ...",
              file=sys.stderr, flush=True)
        cluster.start(a.timeout)
        r = cluster.router
        gateway = f"  OpenAI http://{r.host}:{r.ports[3]}/v1" if r.ports[3] > 0 else ""
        print(f"[baton] cluster ready: gRPC {r.grpc}  HTTP http://{r.http}  metrics {r.metrics}{gateway}\n"
              f"[baton] name service {cluster.etcd.url}; node logs under {cluster.run_root}; Ctrl-C to stop",
              file=sys.stderr, flush=True)
        while True:
            dead = [n.name for n in cluster.nodes.values() if n.proc is not None and n.proc.poll() is not None]
            if dead:
                print(f"[baton] node {dead[0]} exited (its log: {cluster.nodes[dead[0]].log}); stopping the cluster",
                      file=sys.stderr, flush=True)
                tail = cluster.nodes[dead[0]].log.read_text(errors="replace")[-2000:]
                print(tail, file=sys.stderr)
                raise SystemExit(1)
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        _stop_uninterrupted("[baton] stopping the cluster", cluster.stop)


def _kv(argv: list[str]) -> None:
    """`baton kv stats`: the KV tiers of a running node, from its metrics endpoint."""
    import re
    import urllib.request

    ap = argparse.ArgumentParser(prog="baton kv")
    ap.add_argument("action", choices=["stats"])
    ap.add_argument("--url", default="127.0.0.1:8002", help="the node's metrics host:port (baton serve --metrics-port)")
    a = ap.parse_args(argv)
    try:
        text = urllib.request.urlopen(f"http://{a.url}/metrics", timeout=5).read().decode()
    except OSError as e:
        raise SystemExit(f"baton kv stats: no metrics at http://{a.url}/metrics ({e}); is a node serving there?") from None
    rows: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^baton:kv_tier_(\w+?)(?:_total)?\{[^}]*tier="(\w+)"[^}]*\} (\S+)$', text, re.M):
        rows.setdefault(m.group(2), {})[m.group(1)] = float(m.group(3))
    if not rows:
        raise SystemExit("baton kv stats: this node has no KV tiers (profile single_node_tiers, or kv_tiers in "
                         "[engine]), or has served nothing yet")
    cols = ["lookups", "hits", "bytes_read", "bytes_written", "failures", "used_bytes"]
    print(f"{'tier':8}" + "".join(f"{c:>15}" for c in cols) + f"{'hit ratio':>11}")
    for tier in ("device", "host", "store", "disk"):
        if tier in rows:
            r = rows[tier]
            ratio = r.get("hits", 0) / r["lookups"] if r.get("lookups") else 0.0
            print(f"{tier:8}" + "".join(f"{r.get(c, 0):>15.0f}" for c in cols) + f"{ratio:>11.1%}")


COMMANDS = {
    "make-checkpoint": lambda argv: __import__("baton.tools.make_checkpoint", fromlist=["main"]).main(argv),
    "quantize-rtn": lambda argv: __import__("baton.tools.quantize_rtn", fromlist=["main"]).main(argv),
    "train-tiny": lambda argv: __import__("baton.tools.train.tiny", fromlist=["main"]).main(argv),
    "generate": _generate,
    "serve": _serve,
    "client": _client,
    "cluster": _cluster,
    "kv": _kv,
    "gateway": lambda argv: __import__("baton.backends.gateway.__main__", fromlist=["main"]).main(argv),
}


def main(argv: list[str] | None = None) -> None:
    from .runtime import configure_process

    configure_process()              # before any command loads torch
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print("usage: baton {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        raise SystemExit(2)
    try:
        COMMANDS[argv[0]](argv[1:])
    except (ValueError, RuntimeError, OSError) as e:
        # what cannot start says why in one line (the messages name the setting); BATON_DEBUG=1 keeps
        # the traceback
        if argv[0] not in ("serve", "cluster", "generate", "gateway") or os.environ.get("BATON_DEBUG"):
            raise
        print(f"baton {argv[0]}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
