"""Model families by name. A family registers itself by being listed here."""

from __future__ import annotations

import importlib

from linewatch.models.base import AnomalyModel, ModelError

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
