"""Render model_repository/ templates for a deployment profile (ensemble_configs/*.toml) into a
run directory, like TensorRT-LLM's fill_template."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import jinja2

from .. import paths
from ..stages.postprocess import RENAME
from . import tensors
from .config import Profile


def _params(values: dict[str, object]) -> str:
    return "\n".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())


def render(profile: Profile, out: Path, node_config: Path) -> Path:
    """Write <out>/<model>/config.pbtxt (each naming the node's config file) and copy each model.py.
    Returns `out`."""
    instances = {m: profile.instances.get(m, 1) for m in profile.models}
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(paths.templates())), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    ctx = {
        "scalars": tensors.SCALARS, "strings": tensors.STRINGS, "instances": instances, "params": _params({"node_config": str(node_config)}),
        "request_tensors": tensors.pbtxt(tensors.PREFILL_REQUEST), "request_names": [n for n, _, _ in tensors.PREFILL_REQUEST],
        "handle_tensors": tensors.pbtxt(tensors.HANDLE), "stream_tensors": tensors.pbtxt(tensors.STREAM),
        "user_tensors": tensors.pbtxt(tensors.USER), "handle_names": [n for n, _, _ in tensors.HANDLE],
        "stream_names": [n for n, _, _ in tensors.STREAM], "user_names": [n for n, _, _ in tensors.USER],
        "stream_to_user": RENAME, "draft_call_tensors": tensors.pbtxt(tensors.DRAFT_CALL),
        "draft_reply_tensors": tensors.pbtxt(tensors.DRAFT_REPLY),
    }
    if out.exists():
        shutil.rmtree(out)
    served: dict[str, str] = {}
    for template in profile.models:
        cfg = env.get_template(f"{template}/config.pbtxt.j2").render(**ctx)
        name = served_name(cfg)          # a template may serve under another name (llm_front -> llm)
        if name in served:
            raise ValueError(f"profile {profile.name}: {template!r} and {served[name]!r} both serve {name!r}")
        served[name] = template
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(cfg)
        src = paths.templates() / template / "1" / "model.py"
        if src.is_file():
            shutil.copy2(src, out / name / "1" / "model.py")
    return out


def served_name(config_pbtxt: str) -> str:
    m = re.search(r'^name:\s*"([^"]+)"', config_pbtxt, re.M)
    if m is None:
        raise ValueError("a model template must start with name: \"...\"")
    return m.group(1)
