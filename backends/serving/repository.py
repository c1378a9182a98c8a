"""Render model_repository/ templates for a deployment profile (ensemble_configs/*.toml) into a
run directory, like TensorRT-LLM's fill_template."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import jinja2
import tomllib

from .. import paths
from ..stages.postprocess import RENAME
from . import tensors



@dataclass
class Profile:
    name: str
    models: list[str]
    instances: dict[str, int]
    engine: dict

    @classmethod
    def load(cls, name_or_path: str) -> Profile:
        path = Path(name_or_path)
        if not path.is_file():
            path = paths.profiles() / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in paths.profiles().glob("*.toml"))
            raise FileNotFoundError(f"no deployment profile {name_or_path!r}; known: {known}")
        d = tomllib.loads(path.read_text())
        if "extends" in d:            # a variant: the base profile with these keys replaced or merged
            base = cls.load(d["extends"])
            return cls(path.stem, d.get("models", base.models), base.instances | d.get("instances", {}),
                       base.engine | d.get("engine", {}))
        return cls(path.stem, d["models"], d.get("instances", {}), d.get("engine", {}))


def _params(values: dict[str, object]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def render(profile: Profile, out: Path, stage_params: dict[str, object]) -> Path:
    """Write <out>/<model>/config.pbtxt and copy each model.py. Returns `out`."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(paths.templates())), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    ctx = {
        "scalars": tensors.SCALARS, "instances": profile.instances, "params": _params(stage_params),
        "handle_tensors": tensors.pbtxt(tensors.HANDLE), "stream_tensors": tensors.pbtxt(tensors.STREAM),
        "user_tensors": tensors.pbtxt(tensors.USER), "handle_names": [n for n, _, _ in tensors.HANDLE],
        "stream_names": [n for n, _, _ in tensors.STREAM], "user_names": [n for n, _, _ in tensors.USER],
        "postprocess": "postprocess" in profile.models, "stream_to_user": RENAME,
    }
    if out.exists():
        shutil.rmtree(out)
    for model in profile.models:
        (out / model / "1").mkdir(parents=True)
        cfg = env.get_template(f"{model}/config.pbtxt.j2").render(**ctx)
        (out / model / "config.pbtxt").write_text(cfg)
        src = paths.templates() / model / "1" / "model.py"
        if src.is_file():
            shutil.copy2(src, out / model / "1" / "model.py")
    return out
