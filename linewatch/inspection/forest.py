"""Learned classifiers (the categorizer's forests, the region extent's forest) as files.

A fitted scikit-learn estimator is stored with skops (a secure format: no pickle, only the
types listed in ``TRUSTED`` are rebuilt) in the profile's version folder, beside the model's
weights; ``profile.json`` names the file. Loading happens once per profile load, so the hot path
calls ``predict_proba`` on a ready estimator and walks no JSON.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

FOREST_SUFFIX = ".skops"
# the types skops may rebuild beyond its own safe defaults (trees), and the estimators a file may hold
TRUSTED = ["sklearn.tree._tree.Tree", "numpy.dtype"]
ESTIMATORS = ("RandomForestClassifier", "LogisticRegression")


def classifier_proba(clf: Any, x: np.ndarray) -> np.ndarray:
    """(n, n_classes) probabilities of a fitted classifier on already scaled rows; a list of
    classifiers (an ensemble) gives the mean of its members'."""
    if isinstance(clf, (list, tuple)):
        return np.mean([classifier_proba(m, x) for m in clf], axis=0)
    return clf.predict_proba(np.asarray(x, np.float64))


class _NoTorch(importlib.abc.MetaPathFinder):
    """Makes ``import torch`` fail (ImportError) while it sits first on ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torch" or fullname.startswith("torch."):
            raise ImportError(f"{fullname}: not imported while skops.io loads (linewatch.inspection.forest)")
        return None


def _skops_io() -> Any:
    """``skops.io``, imported without torch.

    Importing skops.io lists scikit-learn's estimators (``sklearn.utils.all_estimators``), which
    walks every scikit-learn package, ``sklearn.externals.array_api_compat.torch`` included, and
    that one imports torch: ~600 MB in a worker whose ONNX engine needs no torch
    (tests/test_imports.py). Unless torch is loaded already, ``import torch`` fails while
    skops.io is first imported; the walk skips packages that fail to import, and a torch engine
    can still import torch afterwards."""
    if "skops.io" in sys.modules or "torch" in sys.modules:
        import skops.io as sio

        return sio
    blocker = _NoTorch()
    sys.meta_path.insert(0, blocker)
    try:
        import skops.io as sio
    finally:
        sys.meta_path.remove(blocker)
    return sio


def save_classifier(clf: Any, path: str | Path) -> Path:
    """Write one fitted estimator (or a list of them) with skops."""
    sio = _skops_io()

    path = Path(path)
    sio.dump(list(clf) if isinstance(clf, tuple) else clf, path)
    return path


def load_classifier(path: str | Path) -> Any:
    """Read a stored estimator (or list of them). skops rebuilds only its safe types plus
    ``TRUSTED``; anything but the ``ESTIMATORS`` linewatch stores is refused. Prediction is made
    single-threaded (a worker runs many frames side by side, not one frame on many threads)."""
    sio = _skops_io()

    from linewatch.errors import ModelError

    from skops.io.exceptions import UntrustedTypesFoundException

    path = Path(path)
    try:
        clf = sio.load(path, trusted=TRUSTED)
    except UntrustedTypesFoundException as exc:
        raise ModelError(f"{path}: refused types ({exc}): not a linewatch classifier") from None
    except FileNotFoundError:
        raise ModelError(f"{path}: missing classifier file") from None
    except Exception as exc:
        raise ModelError(f"{path}: not a readable skops file ({type(exc).__name__}: {exc})") from None
    for m in clf if isinstance(clf, list) else [clf]:
        if type(m).__name__ not in ESTIMATORS or not type(m).__module__.startswith("sklearn."):
            raise ModelError(f"{path}: holds a {type(m).__module__}.{type(m).__name__}, not a linewatch classifier "
                             f"({', '.join(ESTIMATORS)})")
        if hasattr(m, "n_jobs"):
            m.n_jobs = 1
    return clf


def externalise(obj: Any, folder: Path, stem: str) -> Any:
    """A JSON-able copy of ``obj`` with every fitted estimator written to ``folder`` and replaced
    by ``{"skops": file name}`` (names from ``stem`` and the key path)."""
    if _is_estimator(obj):
        name = f"{stem}{FOREST_SUFFIX}"
        save_classifier(obj, folder / name)
        return {"skops": name}
    if isinstance(obj, dict):
        return {k: externalise(v, folder, f"{stem}-{k}" if k != "classifier" else stem) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and obj and all(_is_estimator(v) for v in obj):
        name = f"{stem}{FOREST_SUFFIX}"
        save_classifier(list(obj), folder / name)
        return {"skops": name}
    return obj


def internalise(obj: Any, folder: Path) -> Any:
    """The inverse of ``externalise``: ``{"skops": name}`` entries loaded from ``folder``."""
    if isinstance(obj, dict):
        if set(obj) == {"skops"}:
            return load_classifier(folder / obj["skops"])
        return {k: internalise(v, folder) for k, v in obj.items()}
    return obj


def stored_files(obj: Any) -> Sequence[str]:
    """The skops file names ``obj`` refers to."""
    if isinstance(obj, dict):
        if set(obj) == {"skops"}:
            return [obj["skops"]]
        return [f for v in obj.values() for f in stored_files(v)]
    return []


def _is_estimator(obj: Any) -> bool:
    return hasattr(obj, "predict_proba") and hasattr(obj, "classes_")
