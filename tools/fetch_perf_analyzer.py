"""Unpack NVIDIA's perf_analyzer into a folder, from PyPI wheels (nothing is installed):

    python -m baton.tools.fetch_perf_analyzer .cache/tools   ->  .cache/tools/perf_analyzer

The binary ships inside the tritonclient 2.51.0 wheel (later wheels carry none, and later builds need
glibc 2.38); it links libcudart.so.12 even on CPU hosts, taken from the nvidia-cuda-runtime-cu12
wheel. It also needs Debian's libb64-0d (`make sysdeps`). `perf_analyzer` is a small script that
points the loader at the unpacked library."""

from __future__ import annotations

import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = ["tritonclient==2.51.0", "nvidia-cuda-runtime-cu12==12.9.79"]
BINARY = "tritonclient-2.51.0.data/data/bin/perf_analyzer"
CUDART = "nvidia/cuda_runtime/lib/libcudart.so.12"


def fetch(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, *WHEELS], check=True)
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                names = set(z.namelist())
                if BINARY in names:
                    (out / "perf_analyzer.bin").write_bytes(z.read(BINARY))
                if CUDART in names:
                    (out / "lib").mkdir(exist_ok=True)
                    (out / "lib" / "libcudart.so.12").write_bytes(z.read(CUDART))
    binary = out / "perf_analyzer.bin"
    if not binary.is_file() or not (out / "lib" / "libcudart.so.12").is_file():
        raise SystemExit(f"perf_analyzer or libcudart.so.12 missing from {WHEELS}")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    script = out / "perf_analyzer"
    script.write_text('#!/bin/sh\nd="$(dirname "$0")"\nLD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" '
                      'exec "$d/perf_analyzer.bin" "$@"\n')
    script.chmod(0o755)
    return script


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/tools")))
