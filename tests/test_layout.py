"""The package layout: one name per module, a serving import path free of the training stack, no
process-wide side effects at import, data found as package data, and a wheel that carries it all."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python(code, cwd=ROOT, flags=()):
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", ["backends", "kernels", "tools", "backends.engine"])
def test_top_level_folders_are_not_a_second_name_for_baton_modules(name):
    r = python(f"import {name}")            # from the repository root, where the folders are on sys.path
    assert r.returncode != 0 and f"import this package as baton.{name.split('.')[0]}" in r.stderr, r.stderr


def test_serving_does_not_import_the_training_stack():
    """Serving imports with transformers, tqdm and baton.tools made unimportable, as in an install
    without the `train` extra (torch.hub's own optional tqdm import falls back by itself)."""
    r = python("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('transformers', 'tqdm') or name.startswith('baton.tools'):\n"
               "            raise ImportError(f'blocked: {name}')\n"
               "sys.meta_path.insert(0, Block())\n"
               "import baton.backends.serving.launcher, baton.backends.stages.decode_worker, baton.backends.cli\n"
               "import baton.backends.stages.prefill, baton.backends.stages.preprocess, baton.backends.stages.decode\n"
               "import baton.backends.kv.manager, baton.backends.engine\n", flags=("-P",))
    assert r.returncode == 0, r.stdout + r.stderr


def test_importing_baton_changes_nothing_in_the_process():
    r = python("import os, sys\nenv = dict(os.environ)\nthreads = None\n"
               "import baton, baton.backends.engine, baton.kernels\n"
               "import torch\n"
               "assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())\n"
               "assert 'GOMP_SPINCOUNT' not in os.environ\n"
               "import baton.kernels.cpu_ext as e; e.available()\n"
               "assert os.environ['PATH'] == env['PATH']\n"
               "print(torch.get_num_threads())", flags=("-P",))
    assert r.returncode == 0, r.stderr
    r2 = python("import baton, sys; assert 'torch' not in sys.modules; print(baton.LLM.__module__)", flags=("-P",))
    assert r2.returncode == 0 and "llm" in r2.stdout, r2.stderr


def test_data_is_found_through_the_package(tmp_path):
    from baton.backends import paths

    assert (paths.templates() / "llm" / "config.pbtxt.j2").is_file()
    assert (paths.profiles() / "single_node.toml").is_file()
    assert (paths.default_model() / "config.json").is_file()
    r = subprocess.run([sys.executable, "-P", "-c", "from baton.backends import paths; print(paths.templates())"],
                       cwd=tmp_path, capture_output=True, text=True, env={"BATON_HOME": str(tmp_path), "PATH": ""})
    assert r.stdout.strip() == str(tmp_path / "model_repository"), r.stderr


@pytest.mark.slow
def test_wheel_carries_code_templates_profiles_and_the_default_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("baton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ["baton/__init__.py", "baton/backends/engine/llm_engine.py", "baton/kernels/csrc/cpu_ops.cpp",
              "baton/model_repository/llm/config.pbtxt.j2", "baton/model_repository/decode/1/model.py",
              "baton/ensemble_configs/single_node.toml", "baton/models/baton-tiny/model.safetensors",
              "baton/models/baton-tiny/tokenizer.json", "baton/tools/make_checkpoint.py"]:
        assert f in names, f
    assert not any(n.startswith(("backends/", "kernels/", "tests/")) for n in names)
    import shutil

    shutil.rmtree(ROOT / "build", ignore_errors=True)       # pip's in-tree build folder
