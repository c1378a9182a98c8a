"""Watches a node's processes: tritonserver, the KV manager, and every process in tritonserver's
process group (the stage stubs and the decode worker they start). Any of them gone is a node failure,
reported with which process it was; `baton serve` then stops the node and exits non-zero, so nothing
keeps answering "ready" for a node that can no longer serve.

Stage processes are found through /proc: tritonserver leads its own session (started with
start_new_session), so its children share its process group id."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def _group_members(pgid: int) -> dict[int, str]:
    """pid -> a short name, for every live process whose process group is `pgid`."""
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()     # after "pid (comm) ": state ppid pgrp ...
            if fields[0] == "Z" or int(fields[2]) != pgid:
                continue
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        out[int(d.name)] = _name(int(d.name), [a.decode(errors="replace") for a in argv if a])
    return out


def _name(pid: int, argv: list[str]) -> str:
    if any(a.endswith("decode_worker") for a in argv):
        return f"decode worker (pid {pid})"
    if argv and argv[0].endswith("triton_python_backend_stub"):
        model = next((Path(a).parts[-3] for a in argv[1:] if a.endswith("model.py")), "?")
        return f"stage stub of model {model!r} (pid {pid})"
    if argv and argv[0].endswith("tritonserver"):
        return f"tritonserver (pid {pid})"
    return f"process {' '.join(argv)[:80]!r} (pid {pid})"


@dataclass
class Supervisor:
    server: subprocess.Popen
    manager: subprocess.Popen | None      # None: a node without a pool (pd_router)
    gateway: subprocess.Popen | None = None
    front: subprocess.Popen | None = None     # Baton's HTTP front
    watched: dict[int, str] = field(default_factory=dict)

    def snapshot(self) -> None:
        """Record the stage processes once the node is ready (they are all up by then)."""
        self.watched = {pid: name for pid, name in _group_members(self.server.pid).items() if pid != self.server.pid}

    def failure(self) -> str | None:
        """Which process died, or None while every one is alive."""
        if self.server.poll() is not None:
            return f"tritonserver exited with code {self.server.returncode}"
        if self.manager is not None and self.manager.poll() is not None:
            return f"the KV manager exited with code {self.manager.returncode}"
        if self.gateway is not None and self.gateway.poll() is not None:
            return f"the OpenAI gateway exited with code {self.gateway.returncode}"
        if self.front is not None and self.front.poll() is not None:
            return f"the HTTP front exited with code {self.front.returncode}"
        gone = [name for pid, name in self.watched.items() if not _alive(pid)]
        if gone and self.server.poll() is not None:     # the server went first, taking its stages along
            return f"tritonserver exited with code {self.server.returncode}"
        return f"{gone[0]} died" if gone else None


def _alive(pid: int) -> bool:
    """Running (not a zombie). Cheap: one small /proc read per watched process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
