"""Export a model's whole inference graph to one ONNX file with a dynamic batch axis.

Input ``images``: float32 (N, 3, H, W), RGB 0..255. Outputs ``maps`` (N, H, W) and ``scores``
(N,). Normalisation, backbone, scoring, upsampling, blur and the image score are all inside,
so ONNX Runtime / TensorRT run the same graph torch does. Uses the TorchScript-based exporter
(no onnxscript dependency); the file is checked with ``onnx.checker`` after writing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch

from linewatch.models.base import AnomalyModel, ModelError

INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "scores")


def _export_module(model: AnomalyModel) -> torch.nn.Module:
    fn = getattr(model, "export_module", None)
    return (fn() if callable(fn) else model.inference_module()).eval()


def export_onnx(model: AnomalyModel, path: str | Path, opset: int = 17) -> Path:
    """Write ``model``'s inference graph to ``path`` (atomically) and return the path."""
    import onnx

    path = Path(path)
    module = _export_module(model)
    size = model.input_size
    example = torch.zeros(2, 3, size, size)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, (example,), buf, dynamo=False, opset_version=opset,
                input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                dynamic_axes={INPUT_NAME: {0: "batch"}, "maps": {0: "batch"}, "scores": {0: "batch"}},
                do_constant_folding=False,  # keep packed float16 factors packed; ORT folds at load
            )
        except Exception as exc:
            raise ModelError(f"{path}: ONNX export of {model.kind} failed ({type(exc).__name__}: {exc})") from exc
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto)
    meta = {"linewatch.kind": model.kind, "linewatch.input_size": str(size),
            "linewatch.backbone": model.backbone_name}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(proto.SerializeToString())
    tmp.replace(path)
    return path
