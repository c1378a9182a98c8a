"""Run a real tritonserver without Docker or a GPU (see shared/NOTES.md for the verified recipe):
the binary and Python backend from the `nvidia-pytriton` wheel (or /opt/tritonserver in the NGC
image), a private backend dir holding the Python 3.x stub, and an environment that makes the stub
embed this interpreter (so it sees this venv's numpy/torch)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import die_with_parent


class TritonError(RuntimeError):
    pass


# Triton's protocols a client of the `llm` model has no business with: registering shared memory
# (any client could map the node's /dev/shm weight file and overwrite every user's model), loading
# and unloading models, trace and log settings. Health, metadata, model configs and statistics (read
# only, the latter public on the metrics port anyway; perf_analyzer and genai-perf read both) and
# inference stay open.
ADMIN_APIS = ("shared-memory", "model-repository", "trace", "logging")
ADMIN_HEADER = "baton-admin-key"


@dataclass
class TritonInstall:
    binary: Path
    backend_src: Path            # dir with libtriton_python.so + triton_python_backend_utils.py
    stub: Path | None            # triton_python_backend_stub for this Python, if not in backend_src
    libs: list[Path] = field(default_factory=list)

    @classmethod
    def find(cls) -> TritonInstall:
        site = Path(sysconfig.get_paths()["purelib"])
        wheel = site / "pytriton" / "tritonserver"
        if (wheel / "bin" / "tritonserver").is_file():
            ver = f"{sys.version_info.major}.{sys.version_info.minor}"
            stub = wheel / "python_backend_stubs" / ver / "triton_python_backend_stub"
            if not stub.is_file():
                raise TritonError(f"pytriton wheel has no Python backend stub for Python {ver}")
            return cls(wheel / "bin" / "tritonserver", wheel / "backends" / "python", stub,
                       [site / "nvidia_pytriton.libs"])
        ngc = Path("/opt/tritonserver")
        if (ngc / "bin" / "tritonserver").is_file():
            return cls(ngc / "bin" / "tritonserver", ngc / "backends" / "python", None, [ngc / "lib"])
        raise TritonError("tritonserver not found: `pip install --no-deps nvidia-pytriton==0.7.0` "
                          "(make venv does this) or run inside the NGC tritonserver image")

    def backend_dir(self, root: Path) -> Path:
        """A private --backend-directory: python/ with the backend library, utils and our stub."""
        py = root / "python"
        py.mkdir(parents=True, exist_ok=True)
        for f in self.backend_src.iterdir():
            if f.is_file() and not (py / f.name).exists():
                shutil.copy2(f, py / f.name)
        if self.stub is not None and not (py / self.stub.name).exists():
            shutil.copy2(self.stub, py / self.stub.name)
        return root

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [libdir] + [str(p) for p in self.libs] + [env.get("LD_LIBRARY_PATH", "")])
        return env


@dataclass
class TritonServer:
    """One tritonserver process on 127.0.0.1."""

    repository: Path
    workdir: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    shm_prefix: str
    log_path: Path
    proc: subprocess.Popen | None = None
    address: str = "127.0.0.1"       # where HTTP and gRPC listen (a PD node: every interface)
    http_address: str = ""           # where HTTP listens, if not `address` (127.0.0.1 behind Baton's HTTP front)

    def start(self, install: TritonInstall | None = None, extra_env: dict[str, str] | None = None,
              models: list[str] | None = None, admin_key: str = "") -> None:
        """admin_key: Triton's administrative APIs (ADMIN_APIS) answer only requests that carry the
        header ADMIN_HEADER with this value; "" leaves them open."""
        install = install or TritonInstall.find()
        cmd = self.command(install, models, admin_key)
        env = install.env() | (extra_env or {})
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # its own session (stop() signals the whole group), and it dies with us if we are killed
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                     preexec_fn=die_with_parent)

    def command(self, install: TritonInstall, models: list[str] | None = None, admin_key: str = "") -> list[str]:
        backends = install.backend_dir(self.workdir / "backends")
        cmd = [
            str(install.binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
            "--disable-auto-complete-config", "--allow-gpu-metrics=false", f"--http-address={self.http_address or self.address}",
            f"--http-port={self.http_port}", f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--metrics-address={self.address}",       # else: the HTTP address, loopback behind the front
            "--exit-timeout-secs=5", "--log-verbose=" + os.environ.get("BATON_TRITON_VERBOSE", "0"),
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if models is not None:
            cmd += ["--model-control-mode=explicit"] + [f"--load-model={m}" for m in models]
        if admin_key:
            apis = ",".join(ADMIN_APIS)
            cmd += [f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
                    f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}"]
        return cmd

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/v2/health/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float, progress: Callable[[], None] | None = None) -> None:
        """A stage that fails to load leaves the server NOT READY without exiting: always bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise TritonError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.ready():
                return
            if progress:
                progress()
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL the whole process group after a deadline; remove our shm regions."""
        if self.proc is not None:
            pgid = self.proc.pid          # start_new_session: the server leads a group with its stubs
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _group_alive(pgid):
                self.proc.poll()          # reap the server itself
                time.sleep(0.05)
            if _group_alive(pgid):        # stubs (and their workers) that did not finish in time
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for f in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            f.unlink(missing_ok=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
