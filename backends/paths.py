"""Where Baton's data lives: the Triton model templates (model_repository/), the deployment profiles
(ensemble_configs/) and the embedded default model (models/baton-tiny). They are package data of
`baton`, so a checkout, an installed wheel and a container image all carry them; BATON_HOME=DIR
points at another root holding the same three folders."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path


def data_root() -> Path:
    env = os.environ.get("BATON_HOME")
    return Path(env) if env else Path(str(files("baton")))


def templates() -> Path:
    return data_root() / "model_repository"


def profiles() -> Path:
    return data_root() / "ensemble_configs"


def default_model() -> Path:
    return data_root() / "models" / "baton-tiny"
