"""Process settings that an entry point (CLI, stage process, benchmark) makes for itself. Nothing
in Baton changes them at import: a library must not retune its host's OpenMP or threads."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

# OpenMP workers spin ~1.5 ms between parallel regions: a decode step is hundreds of short ops, and
# re-waking sleeping workers cost ~15% of step time here. Not much longer: 1,000,000 spins (~28 ms)
# kept an idle stage's workers burning a core after its work ended, the core the other stage needed
# (idle-server TTFT 96.9 -> 86.1 ms with 50,000; engine decode unchanged).
GOMP_SPINCOUNT = "50000"


def process_env() -> dict[str, str]:
    """The environment variables a Baton process wants (an explicit setting always wins); the
    launcher passes them to tritonserver, whose stage processes inherit them."""
    return {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT", GOMP_SPINCOUNT)}


def configure_process(threads: int = 0) -> None:
    """Call first in an entry point. libgomp reads GOMP_SPINCOUNT when torch loads it, so that part
    only takes effect before torch is imported; `threads` > 0 sets torch's intra-op threads. Stage
    logs (per-request lines at INFO, keyed by request id) go to stderr at BATON_LOG_LEVEL (WARNING)."""
    logging.basicConfig(level=os.environ.get("BATON_LOG_LEVEL", "WARNING").upper(),
                        format="[baton %(name)s] %(message)s")
    faulthandler.enable(all_threads=True)     # a crash leaves every thread's stack in the stage's log
    if "torch" not in sys.modules:
        os.environ.update(process_env())
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed ops on n torch threads (0: as set), then restore the count."""
    import torch

    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lower_priority(nice: int, threads: Iterable[int] | None = None) -> None:
    """Run these threads (None: every thread of this process; threads they start later inherit it)
    at OS priority `nice` or lower: throughput work that shares cores with latency work yields to it."""
    for tid in (int(t) for t in os.listdir("/proc/self/task")) if threads is None else threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:                          # the thread ended meanwhile
            pass


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """preexec_fn for a child process: the kernel sends it SIGTERM when its parent dies, so a killed
    `baton serve` (or stage stub) does not leave its servers and workers running."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Every name Baton creates in /dev/shm and in the temp folder carries the creating process's PID:
# baton-kv-<pid>-<id>, baton-weights-<pid>-<id>, baton-<pid>-<id>[-...] (run dirs, Triton's regions).
_OWNED = re.compile(r"^baton-(?:kv-|weights-|emb-)?(\d+)-[0-9a-f]")


def owned_name(tag: str) -> str:
    """A fresh '<pid>-<hex>' id for names that remove_leftovers() can attribute to this process."""
    return f"{os.getpid()}-{tag}"


def remove_leftovers(*dirs: Path) -> list[Path]:
    """Remove Baton files and run directories whose creating process is dead (a run that was killed
    before it could clean up). Returns what was removed."""
    removed = []
    for d in dirs:
        for p in d.glob("baton-*"):
            m = _OWNED.match(p.name)
            if not m or _pid_alive(int(m.group(1))):
                continue
            try:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's live process
        return True
    return True


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; reaped either way. None or already gone: nothing to do."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
