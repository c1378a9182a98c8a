import os
import shutil
from pathlib import Path

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Must be set
# before anything imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

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


def baton_serve(model_dir, run_root):
    """`baton serve` in a subprocess (free ports, run dirs under run_root), returned once it says it is
    serving: (process, its run dir). The caller kills it."""
    import subprocess
    import sys

    from baton.backends.serving.launcher import free_port

    env = dict(os.environ, BATON_RUN_DIR=str(run_root))
    ports = [str(free_port()) for _ in range(4)]
    proc = subprocess.Popen([sys.executable, "-P", "-m", "baton.backends.cli", "serve", "--model", str(model_dir),
                             "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2],
                             "--gateway-port", ports[3]],
                            env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "serving; Ctrl-C to stop" in line:
            return proc, next(Path(run_root).glob("baton-*"))
    proc.kill()
    raise RuntimeError("baton serve did not start:\n" + "".join(lines))
