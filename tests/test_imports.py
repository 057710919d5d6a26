"""Lean services: a process that runs no model never imports torch.

A producer, the sink, the dashboard and every ``--help`` load only what they use. torch (with its
CUDA libraries) costs seconds to import and hundreds of MB resident; it belongs to the worker's
engines and to calibration, and only once they actually build or load a model. Each entry point is
imported in a fresh interpreter (``sys.executable``), so what an earlier test imported can't hide
or fake anything. When torch does get imported, the failure shows the import chain that pulled it
in (the stack at the moment ``torch`` was first looked up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "IMPORT-PROBE "
# reported, not asserted: libraries that a lean process should not need either
HEAVY = ("torch", "torchvision", "onnxruntime", "tensorrt", "sklearn", "skimage", "scipy", "streamlit",
         "pandas", "matplotlib", "duckdb", "cv2", "kafka")

# Runs before the entry point: records the stack each time `torch` is looked up.
_SPY = textwrap.dedent(
    """
    import sys, traceback
    _torch_lookups = []
    class _TorchSpy:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and len(_torch_lookups) < 3:
                _torch_lookups.append([
                    f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
                    for f in traceback.extract_stack()[:-1]
                    if not f.filename.startswith("<frozen")
                ])
            return None
    sys.meta_path.insert(0, _TorchSpy())
    """
)
_REPORT = textwrap.dedent(
    """
    import json as _json
    print({marker!r} + _json.dumps({{
        "torch": "torch" in sys.modules,
        "heavy": sorted(m for m in {heavy!r} if m in sys.modules),
        "lookups": _torch_lookups,
    }}), flush=True)
    """
)


def _probe(entry: str) -> dict:
    code = _SPY + textwrap.dedent(entry) + _REPORT.format(marker=MARKER, heavy=HEAVY)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert proc.returncode == 0 and lines, (
        f"entry point failed (exit {proc.returncode}):\n{entry}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    result = json.loads(lines[-1][len(MARKER):])
    result["code"] = code.splitlines()
    return result


def _torch_chain(result: dict) -> str:
    out = []
    for number, stack in enumerate(result["lookups"], 1):
        out.append(f"torch lookup {number}, outermost first:")
        for frame in stack:
            if frame.startswith("<string>:"):  # the probe's own line: show its text
                line = int(frame.split(":")[1])
                frame = f"<entry point>: {result['code'][line - 1].strip()}"
            out.append(f"  {frame}")
    return "\n".join(out) or "(torch came in without an import lookup)"


def _help(command: str) -> str:
    return f"""
    import linewatch.cli as c
    try:
        c.main([{command!r}, "--help"])
    except SystemExit:
        pass
    """


ENTRY_POINTS = {
    "build_parser": "import linewatch.cli as c; c.build_parser()",
    "services": "import producers.producer, workers.sink, dashboard.queries",
    "bridges": "import bridges.loop, bridges.mqtt, bridges.opcua, bridges.cli",
    **{f"{cmd} --help": _help(cmd) for cmd in ("produce", "sink", "dashboard", "broker", "calibrate", "work", "bench",
                                               "bridge", "contracts")},
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS), ids=list(ENTRY_POINTS))
def test_entry_point_does_not_import_torch(entry):
    """Building the CLI, importing the producer, the sink and the dashboard's queries, and every
    subcommand's --help run no model, so they never import torch: a producer or a sink container
    stays small and starts fast, and --help answers at once. Model libraries are imported where a
    model is built or loaded (workers/engines.py, calibration), not at module level on the way."""
    result = _probe(ENTRY_POINTS[entry])
    print(f"{entry}: heavy modules loaded: {', '.join(result['heavy']) or 'none'}")
    assert not result["torch"], f"{entry!r} imported torch:\n{_torch_chain(result)}"


_HWM_PROBE = r"""
import sys
from linewatch.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit:
    pass
print(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _peak_rss_mb(command: str) -> tuple[int, float, str]:
    """Exit code, peak resident set (MB) and output of ``linewatch COMMAND --help`` in a fresh
    interpreter, from the kernel's high-water mark of that process's own memory (VmHWM): the
    fork from this (large) test process is not counted, as ``ru_maxrss`` would count it."""
    out = subprocess.run([sys.executable, "-c", _HWM_PROBE, command], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    hwm = [ln for ln in out.stdout.splitlines() if ln.startswith("VmHWM")]
    kib = int(hwm[-1].split()[1]) if hwm else 0
    return out.returncode, kib / 1024, out.stdout + out.stderr


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
@pytest.mark.parametrize("command", ["produce", "sink"])
def test_lean_command_peak_memory(command):
    """A producer or a sink loads no model library, so its whole process stays small. The bound
    is memory, not time (machines are noisy about time, hardly about resident size); torch alone
    would take the process far over it. The figure is printed for the record."""
    rc, peak_mb, out = _peak_rss_mb(command)
    print(f"linewatch {command} --help: peak RSS {peak_mb:.0f} MB")
    assert rc == 0, out[-4000:]
    assert peak_mb < 200, f"linewatch {command} --help peaked at {peak_mb:.0f} MB (bound 200 MB)"


_WORKER_PROBE = r"""
import json, sys
import numpy as np
import psutil
from linewatch.profiles import Registry
from linewatch.settings import WorkerSettings
from workers.profile_cache import ProfileCache
from linewatch.inspection.forest import classifier_proba, load_classifier
from workers.worker import default_engine_factory
cache = ProfileCache(Registry(sys.argv[1]), default_engine_factory(WorkerSettings(threads=1)))
loaded = cache.get("cap")
maps, scores = loaded.engine.run(np.zeros((4, 64, 64, 3), np.uint8))
# the categorizer's and the extent's forests load through the same function (skops)
proba = classifier_proba(load_classifier(sys.argv[2]), np.zeros((2, 3)))
print(json.dumps({"engine": loaded.engine.name, "torch": "torch" in sys.modules, "model": loaded.model is not None,
                  "proba": list(proba.shape),
                  "rss_mb": psutil.Process().memory_info().rss / 2**20, "maps": list(maps.shape)}))
"""


@pytest.mark.slow
def test_a_worker_on_an_onnx_profile_never_imports_torch(tmp_path):
    """A worker whose engine runs the exported graph (ONNX Runtime) needs the torch model for
    nothing: it loads the profile, its forests and the ONNX file, checks the weights' header, and
    never imports torch (a torch engine would load the model: workers.engines.TorchEngine).
    skops.io on its own would import torch (it walks every scikit-learn package): the probe
    loads a stored forest too."""
    import numpy as np
    from sklearn.ensemble import RandomForestClassifier

    from linewatch.inspection.forest import save_classifier

    from linewatch.models.padim import PaDiM
    from linewatch.profiles import Profile, Registry
    from linewatch.synth import SyntheticProduct

    sp = SyntheticProduct("cap", size=64, seed=0)
    model = PaDiM(input_size=64, d=8).fit(np.stack([sp.normal(i).image for i in range(6)]), progress=False)
    Registry(tmp_path / "registry").publish(Profile(product="cap", model_kind="padim", backbone="efficientnet_lite0",
                                       input_size=64, threshold=1.0, threshold_method="manual"), model)
    forest = RandomForestClassifier(n_estimators=3, random_state=0).fit(np.eye(3), [0, 1, 1])
    forest_file = save_classifier(forest, tmp_path / "probe-forest.skops")
    out = subprocess.run([sys.executable, "-c", _WORKER_PROBE, str(tmp_path / "registry"), str(forest_file)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"worker on an ONNX profile: {got}")
    assert got["engine"] == "onnxruntime-cpu" and got["maps"] == [4, 64, 64] and got["proba"] == [2, 2]
    assert not got["torch"] and not got["model"]
    assert got["rss_mb"] < 600
