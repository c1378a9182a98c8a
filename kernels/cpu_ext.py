"""Builds (once per machine, cached) and loads the fused CPU kernels in csrc/cpu_ops.cpp.

Compiled for the host CPU (-march=native) on first use; later processes just load the cached .so.
If there is no compiler, or BATON_CPU_EXT=0, every op falls back to its torch path."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

_SRC = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
_lock = threading.Lock()
_state: dict[str, bool] = {}


def build_dir() -> Path:
    root = os.environ.get("BATON_EXT_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "baton"
    # one directory per checkout: two checkouts sharing one would rewrite build.ninja with their own
    # source path in turn and rebuild (~13 s) every time the other one loaded it
    tag = hashlib.sha1(str(_SRC.resolve()).encode()).hexdigest()[:8]
    d = Path(root) / f"torch{torch.__version__.split('+')[0]}-cpu_ops-{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def built() -> bool:
    """The library is compiled for this checkout (loading it is then quick)."""
    return (build_dir() / "baton_cpu_ops.so").exists()


def available() -> bool:
    """True when torch.ops.baton_cpu is loaded (building it first if needed)."""
    if "ok" in _state:
        return _state["ok"]
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
    return _state["ok"]


def _load() -> bool:
    if os.environ.get("BATON_CPU_EXT", "1") == "0":
        return False
    try:
        from torch.utils.cpp_extension import load

        with _ninja_first_on_path():
            load(name="baton_cpu_ops", sources=[str(_SRC)], build_directory=str(build_dir()),
                 # -ffp-contract=off: multiply-adds fuse only where written, so the attention kernels'
                 # shared arithmetic stays bit-identical wherever it is inlined.
                 # -fopenmp: at::parallel_for is an inline OpenMP region, serial without it. The .so then
                 # needs libgomp.so.1, which resolves to the copy torch already loaded (same SONAME).
                 extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG", "-ffp-contract=off"],
                 extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
        return hasattr(torch.ops.baton_cpu, "paged_decode_attention")
    except Exception as e:  # no compiler / headers: the torch paths still work
        warnings.warn(f"baton: fused CPU kernels unavailable, using torch paths ({e})", stacklevel=2)
        return False


@contextlib.contextmanager
def _ninja_first_on_path() -> Iterator[None]:
    """torch's builder runs `ninja` from PATH. Put the pip-installed one first while it builds (and
    restore PATH after): ninja 1.13 and 1.11 hash build commands differently, so processes that found
    different ninjas (a stub with the venv's bin/ on PATH, a plain `.venv/bin/python`) rebuilt the
    library in turn, ~13 s each time."""
    try:
        import ninja
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old
