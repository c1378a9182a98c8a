import os
import shutil
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Must be set
# before anything imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import baton  # noqa: F401 - before anything loads gRPC: it turns gRPC's fork support off (see baton/__init__)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("BATON_TEST_CACHE", ROOT / ".cache" / "test-checkpoints"))
FAMILIES = ["tiny-qwen3", "tiny-qwen2", "tiny-llama"]

torch.set_num_threads(2)


def _checkpoint(preset: str, **kw) -> Path:
    """Build once per machine (deterministic), reuse afterwards."""
    from baton.tools.make_checkpoint import make_checkpoint

    tag = "-".join([preset] + [f"{k}={v}" for k, v in sorted(kw.items())])
    out = CACHE / tag
    if not (out / "config.json").is_file():
        tmp = CACHE / (tag + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make_checkpoint(preset, tmp, **kw)
        tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def checkpoint():
    return _checkpoint


@pytest.fixture(scope="session")
def qwen3_dir():
    return _checkpoint("tiny-qwen3", dtype="float32")


def prompts_of(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # stay clear of the special tokens at the start of the vocabulary
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def blocks_in_use(kv_address: str, timeout: float = 5.0) -> int:
    """Blocks the node's KV manager has handed out, asked on a socket of our own (stage clients belong
    to their threads). Idle stages give their reserves back within one loop turn, so poll briefly."""
    import time

    from baton.backends.kv.manager import RemoteBlockManager

    client = RemoteBlockManager(kv_address, 1, 16)
    deadline = time.monotonic() + timeout
    while True:
        used = client.stats()["num_used"]
        if used == 0 or time.monotonic() > deadline:
            return used
        time.sleep(0.05)


def baton_serve(model_dir, run_root, sigint_ignored=False):
    """`baton serve` in a subprocess (free ports, run dirs under run_root), returned once it says it is
    serving: (process, its run dir). The caller kills it. sigint_ignored: started as a non-interactive
    shell starts a background job (SIGINT inherited ignored)."""
    import signal
    import subprocess
    import sys

    from baton.backends.serving.launcher import free_port

    env = dict(os.environ, BATON_RUN_DIR=str(run_root))
    ports = [str(free_port()) for _ in range(4)]
    proc = subprocess.Popen([sys.executable, "-P", "-m", "baton.backends.cli", "serve", "--model", str(model_dir),
                             "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                             "--gateway-port", ports[3]],
                            env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "serving; Ctrl-C to stop" in line:
            return proc, next(Path(run_root).glob("baton-*"))
    proc.kill()
    raise RuntimeError("baton serve did not start:\n" + "".join(lines))


@pytest.fixture(scope="module")
def node(qwen3_dir, request):
    """A single_node server (with its OpenAI gateway) on tiny-qwen3, fp32, for one test module
    (a module's NODE_PROFILE picks another profile, its NODE_OVERRIDES change profile keys); its
    stages log each request by id (tests read how decode ended a request)."""
    from baton.backends.serving.launcher import Node

    overrides = {"dtype": "float32", "max_model_len": 256, "max_tokens_limit": 200, "kv_cache_memory_mb": 4}
    n = Node(str(qwen3_dir), getattr(request.module, "NODE_PROFILE", "single_node"),
             overrides=overrides | getattr(request.module, "NODE_OVERRIDES", {}), gateway_port=0)
    os.environ["BATON_LOG_LEVEL"] = "INFO"
    try:
        n.start(timeout=180, quiet=True)
    finally:
        del os.environ["BATON_LOG_LEVEL"]
    yield n
    n.stop()


@pytest.fixture(scope="module")
def offline(qwen3_dir):
    """The in-process engine on the same checkpoint: offline(prompt, **SamplingParams) -> its output
    (greedy, 16 tokens, ignore_eos unless given)."""
    from baton import LLM, SamplingParams

    llm = LLM(qwen3_dir, dtype="float32", num_blocks=64, max_model_len=256)
    defaults = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    yield lambda prompt, **kw: llm.generate(prompt, SamplingParams(**(defaults | kw)))[0]
    llm.close()


# ---- PD clusters (tests/test_pd*.py): nodes on simulated hosts, checked against the offline engine ----
PD_PROMPTS = ["def fibonacci(n):", "The quick brown fox jumps over the lazy dog. " * 6, "import numpy as np\n" * 3,
              "Once upon a time"]
PD_PROFILE = """extends = "pd_{role}"
[engine]
max_model_len = 1024
kv_cache_memory_mb = 16
{engine_extra}
[serving]
max_tokens_limit = 1000
"""


def pd_cluster(qwen3_dir, tmp_path_factory, prefill, decode, engine_extra=""):
    from baton.backends.cluster.local import LocalCluster
    from baton.backends.cluster.netns import NetnsUnavailable

    pytest.importorskip("mooncake.engine", reason="the Mooncake transfer engine (make test installs it)")
    d = tmp_path_factory.mktemp("profiles")
    for role in ("prefill", "decode", "router"):
        (d / f"pd_{role}.toml").write_text(PD_PROFILE.format(role=role, engine_extra=engine_extra))
    try:
        return LocalCluster(str(qwen3_dir), prefill, decode, hosts=True, profile_dir=d).start()
    except NetnsUnavailable as e:
        pytest.skip(f"network namespaces cannot be created here: {e}")


@pytest.fixture(scope="module")
def pd_expected(qwen3_dir):
    from baton import LLM, SamplingParams

    llm = LLM(str(qwen3_dir), dtype="float32", kv_cache_memory_mb=16, max_model_len=1024)
    try:
        greedy = [o.token_ids for o in llm.generate(PD_PROMPTS, SamplingParams(temperature=0, max_tokens=20))]
        seeded = [o.token_ids for o in llm.generate(PD_PROMPTS, [SamplingParams(temperature=0.9, top_p=0.9, seed=7 + i,
                                                                             max_tokens=20) for i in range(4)])]
    finally:
        llm.close()
    return greedy, seeded


def pd_leaks(cluster):
    """Blocks held on every prefill and decode node (in use or handed off), once idle."""
    import time

    deadline = time.monotonic() + 10
    while True:
        held = {n: (st["num_used"], st["handoffs"]) for n in cluster.nodes if n.startswith(("prefill", "decode"))
                for st in [cluster.kv_stats(n)]}
        if all(v == (0, 0) for v in held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.2)




def lora_adapter(base_dir, out, seed: int, **lora_kw):
    """A random (not zero-initialised) PEFT LoRA adapter for the checkpoint in base_dir, saved to out."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():                  # B at the scale of a trained adapter's, not Linear's init
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft.save_pretrained(out)
    return out


def weight_store_round_trip(tensors: dict) -> dict:
    """Weights published in a node's shared weight file and attached back, as a stage sees them (the
    file is removed at once; the mapping stays valid)."""
    import uuid

    from baton.backends.loader import weight_store

    name = f"test-{uuid.uuid4().hex[:8]}"
    try:
        weight_store.publish(name, tensors)
        return weight_store.attach(name)
    finally:
        weight_store.unlink(name)
