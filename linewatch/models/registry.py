"""Model families by name, and loading a saved model by the kind its config names.

The registry knows the families; a family never knows the registry (as torchvision keeps
``get_model`` apart from the models). Importing this module is torch-free: a family's module
(and torch) is imported only when that family is built or loaded.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from linewatch.errors import ModelError

if TYPE_CHECKING:
    from linewatch.models.base import AnomalyModel

CONFIG_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"

# kind -> "module:Class"; imported lazily so a worker only pays for what it serves.
FAMILIES: dict[str, str] = {
    "padim": "linewatch.models.padim:PaDiM",
    "cflow": "linewatch.models.cflow:CFlow",
    "patchcore": "linewatch.models.patchcore:PatchCore",
    "reconstruction": "linewatch.models.reconstruction:FeatureAutoencoder",
    "attribution": "linewatch.models.attribution:AttributionClassifier",
    "meandiff": "linewatch.models.meandiff:MeanDiff",
}


def model_class(kind: str) -> type[AnomalyModel]:
    if kind not in FAMILIES:
        raise ModelError(f"unknown model kind {kind!r} (known: {', '.join(sorted(FAMILIES))})")
    module_name, class_name = FAMILIES[kind].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(kind: str, **kwargs) -> AnomalyModel:
    return model_class(kind)(**kwargs)


def read_model_config(directory: str | Path) -> dict:
    """The checked ``model.json`` of a saved model (kind, input_size, backbone, options).

    Torch-free: a worker serving an exported graph reads what it needs here and never builds
    the model. Raises ModelError naming the file.
    """
    cfg_path = Path(directory) / CONFIG_FILE
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{cfg_path}: missing model config") from None
    except UnicodeDecodeError:
        raise ModelError(f"{cfg_path}: not a JSON text file (binary content refused, never unpickled)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{cfg_path}: not valid JSON ({exc.msg})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    missing = [k for k in ("kind", "input_size", "backbone") if k not in cfg]
    if missing:
        raise ModelError(f"{cfg_path}: missing field(s) {', '.join(missing)}")
    if not isinstance(cfg.get("options", {}), dict):
        raise ModelError(f"{cfg_path}: 'options' must be a JSON object")
    return cfg


def check_weights(path: Path) -> None:
    """Refuse a missing or corrupt weights file from its header alone (safetensors' numpy
    reader: no torch), so a damaged version folder never serves, whichever engine runs it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as fh:
            fh.keys()
    except FileNotFoundError:
        raise ModelError(f"{path}: missing weights") from None
    except Exception as exc:
        raise ModelError(f"{path}: not a valid safetensors file ({exc})") from None


class SavedModel:
    """A saved model folder, loaded (torch and all) on first ``load()`` only: a worker whose
    engine runs the exported graph never builds the model. ``kind`` and ``input_size`` come from
    the torch-free config."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        cfg = read_model_config(self.directory)
        self.kind = str(cfg["kind"])
        self.input_size = int(cfg["input_size"])
        self._model: AnomalyModel | None = None
        check_weights(self.directory / WEIGHTS_FILE)

    def load(self) -> AnomalyModel:
        if self._model is None:
            self._model = load_model(self.directory)
        return self._model


def load_model(directory: str | Path) -> AnomalyModel:
    """The model saved in ``directory`` (``AnomalyModel.save``): config, then safetensors weights
    (never pickle). Raises ModelError naming the file."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_model_config(directory)
    cfg_path = directory / CONFIG_FILE
    klass = model_class(cfg.get("kind", ""))
    try:
        model = klass(input_size=int(cfg["input_size"]), backbone=str(cfg["backbone"]), **cfg.get("options", {}))
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise ModelError(f"{cfg_path}: {exc}") from None
        raise ModelError(f"{cfg_path}: invalid model config ({exc})") from None
    weights = directory / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except FileNotFoundError:
        raise ModelError(f"{weights}: missing weights") from None
    except Exception as exc:  # safetensors raises on a corrupt header
        raise ModelError(f"{weights}: not a valid safetensors file ({exc})") from None
    try:
        model.load_state_tensors(tensors)
    except (KeyError, RuntimeError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"{weights}: tensors do not match the model config ({exc})") from None
    return model
