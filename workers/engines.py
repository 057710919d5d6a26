"""Inference engines behind one interface, and the fallback chain that picks one.

Every engine runs a model's *whole* inference graph (normalisation -> backbone -> scoring ->
upsample -> blur -> image score) on uint8 NHWC RGB frames already at the model's input size,
and returns ``(maps float32 (N, H, W), scores float32 (N,))``. Batches larger than
``max_batch`` are split.

Chain for ``preference="auto"`` (README, Engines):
TensorRT -> ONNX Runtime CUDA -> torch CUDA (half) -> ONNX Runtime CPU -> torch CPU.
The choice and the reason each better engine was skipped are logged and kept on the engine
(``engine.reason``, ``engine.skipped``) for the worker's metrics.

TensorRT cannot be installed on this project's machines (its wheels download from NVIDIA);
the code below is written to the TensorRT 10 API and is import-guarded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from linewatch.errors import UserError

log = logging.getLogger(__name__)

ENGINE_NAMES = ("tensorrt", "onnxruntime-cuda", "torch-cuda", "onnxruntime-cpu", "torch-cpu")
# preference -> the engines it allows, best first
PREFERENCES: dict[str, tuple[str, ...]] = {
    "auto": ENGINE_NAMES,
    "tensorrt": ("tensorrt",),
    "onnxruntime": ("onnxruntime-cuda", "onnxruntime-cpu"),
    "torch": ("torch-cuda", "torch-cpu"),
    **{n: (n,) for n in ENGINE_NAMES},
}


class EngineUnavailable(RuntimeError):
    """This engine cannot run here (missing package, no GPU, no ONNX file); the message says why."""


@runtime_checkable
class Engine(Protocol):
    name: str

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC RGB -> (maps float32 NHW, scores float32 N)."""


def _check_images(images: np.ndarray, size: int) -> np.ndarray:
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
        raise ValueError(f"engine input must be uint8 (N, {size}, {size}, 3), got {images.dtype} {images.shape}")
    return images


def _empty(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, size, size), np.float32), np.zeros((0,), np.float32)


def _gpu_device_present() -> bool:
    """An NVIDIA device node exists: the torch-free first check, so a CPU-only worker never
    imports torch just to learn that CUDA is absent."""
    import glob

    return bool(glob.glob("/dev/nvidia[0-9]*"))


def _cuda_available() -> bool:
    if not _gpu_device_present():
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _cpu_threads(threads: int) -> int:
    if threads > 0:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class _BaseEngine:
    name = "base"
    reason = ""
    # "fp32": maps match the torch CPU reference to float32 rounding; "fp16-backbone": the
    # backbone runs in float16 (scoring stays float32), maps agree to ~1e-2 of their range and
    # masks differ only on boundary pixels.
    precision = "fp32"
    skipped: dict[str, str]

    def __init__(self, input_size: int, max_batch: int):
        self.input_size = int(input_size)
        self.max_batch = max(1, int(max_batch))
        self.skipped = {}
        self._lock = threading.Lock()  # sessions/modules are used from one thread at a time

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = _check_images(images, self.input_size)
        if len(images) == 0:
            return _empty(self.input_size)
        maps, scores = [], []
        with self._lock:
            for i in range(0, len(images), self.max_batch):
                m, s = self._run_batch(images[i : i + self.max_batch])
                maps.append(m)
                scores.append(s)
        if len(maps) == 1:
            return maps[0], scores[0]
        return np.concatenate(maps), np.concatenate(scores)

    def _run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} max_batch={self.max_batch}>"


# ---------------------------------------------------------------------------------------------
class TorchEngine(_BaseEngine):
    """The model's own nn.Module. CPU: float32, channels-last (the module arranges it).
    CUDA: the backbone under autocast float16; models keep their scoring in float32."""

    def __init__(self, model: Any, device: str = "cpu", threads: int = 0, max_batch: int = 16):
        if device == "cuda" and not _gpu_device_present():
            raise EngineUnavailable("torch: no NVIDIA GPU device")
        import torch

        from linewatch.models.registry import SavedModel

        if isinstance(model, SavedModel):  # only this engine needs the model itself
            model = model.load()
        super().__init__(model.input_size, max_batch)
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable("torch: CUDA is not available")
        self.device = device
        self.name = f"torch-{device}"
        self.precision = "fp16-backbone" if device == "cuda" else "fp32"
        module = model.inference_module().eval()
        if device == "cuda":
            import copy

            module = copy.deepcopy(module).to("cuda")
        self.module = module
        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)

    def _run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        # NHWC uint8 -> NCHW float view with channels-last strides: no copy of the layout
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        with torch.inference_mode():
            if self.device == "cuda":
                x = x.to("cuda", non_blocking=True).float()
                with torch.autocast("cuda", dtype=torch.float16):
                    m, s = self.module(x)
                return m.float().cpu().numpy(), s.float().cpu().numpy()
            m, s = self.module(x.float())
        return m.numpy(), s.numpy()


_SHARED_ARENA_LOCK = threading.Lock()
_shared_arena: bool | None = None  # None: not tried yet


def _use_shared_cpu_arena(ort: Any) -> bool:
    """One CPU memory arena for every ONNX Runtime session of the process (registered once).

    Why: each session otherwise grows its own arena to its largest batch (~280 MB for a 256-px
    PaDiM at batch 16), so a worker holding 20 products would need ~6 GB; with one shared arena
    a session costs ~140 MB and the speed is unchanged (measured, issue 6).
    ``LINEWATCH_ORT_SHARED_ARENA=0`` turns it off."""
    global _shared_arena
    with _SHARED_ARENA_LOCK:
        if _shared_arena is None:
            _shared_arena = False
            if os.environ.get("LINEWATCH_ORT_SHARED_ARENA", "1") != "0":
                try:
                    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                                             ort.OrtMemType.DEFAULT)
                    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
                    _shared_arena = True
                except Exception as exc:  # an ORT build without it: per-session arenas, as before
                    log.info("onnxruntime: no shared CPU arena (%s: %s)", type(exc).__name__, exc)
        return _shared_arena


# ---------------------------------------------------------------------------------------------
class OnnxRuntimeEngine(_BaseEngine):
    """ONNX Runtime on the exported graph: CUDA provider where it really runs, else CPU with
    ``intra_op_num_threads`` set (0 = every core this process may use)."""

    def __init__(self, onnx_path: str | Path, input_size: int, device: str = "cpu", threads: int = 0,
                 max_batch: int = 16):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineUnavailable("onnxruntime is not installed") from None
        super().__init__(input_size, max_batch)
        path = Path(onnx_path)
        if not path.is_file():
            raise EngineUnavailable(f"{path}: no ONNX file")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = _cpu_threads(threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        # ORT's idle intra-op threads spin by default: on a 2-core worker that overlaps JPEG
        # decoding and post-processing with the engine, spinning burns the cores the other
        # stages need (measured: 69 -> 106-118 images per CPU-second at batch 8-16 without it)
        spin = os.environ.get("LINEWATCH_ORT_SPINNING", "0")
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin == "1" else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin == "1" else "0")
        if device == "cpu" and _use_shared_cpu_arena(ort):
            so.add_session_config_entry("session.use_env_allocators", "1")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise EngineUnavailable("onnxruntime: no CUDAExecutionProvider in this build")
            if not _cuda_available():
                raise EngineUnavailable("onnxruntime: CUDA provider present but no GPU")
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise EngineUnavailable("onnxruntime: CUDA provider failed to initialise")
        self.device = device
        self.threads = so.intra_op_num_threads
        self.name = f"onnxruntime-{device}"
        self._input = self.session.get_inputs()[0].name

    def _run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
        m, s = self.session.run(None, {self._input: x})
        return m, s


# ---------------------------------------------------------------------------------------------
def _trt_cache_key(onnx_bytes: bytes, gpu: str, trt_version: str, max_batch: int) -> str:
    digest = hashlib.sha256(onnx_bytes).hexdigest()[:16]
    safe_gpu = "".join(c if c.isalnum() else "_" for c in gpu)
    return f"{safe_gpu}__trt{trt_version}__b{max_batch}__fp16__{digest}.engine"


class TensorRTEngine(_BaseEngine):
    """TensorRT 10: built from the ONNX graph once (FP16, optimisation profile batch 1..max_batch),
    serialized into ``<profile>/engines/<gpu>__trt<version>__...engine`` and reused. Scoring
    layers (everything outside the backbone) are pinned to FP32: squared Mahalanobis distances
    overflow float16."""

    def __init__(self, onnx_path: str | Path, input_size: int, max_batch: int = 16,
                 cache_dir: str | Path | None = None):
        try:
            import tensorrt as trt  # type: ignore[import-not-found]
        except ImportError:
            raise EngineUnavailable("tensorrt is not installed") from None
        if not _cuda_available():
            raise EngineUnavailable("tensorrt: no CUDA GPU")
        import torch

        super().__init__(input_size, max_batch)
        self.precision = "fp16-backbone"
        path = Path(onnx_path)
        if not path.is_file():
            raise EngineUnavailable(f"{path}: no ONNX file")
        onnx_bytes = path.read_bytes()
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        gpu = torch.cuda.get_device_name(0)
        cache = Path(cache_dir) if cache_dir else path.parent / "engines"
        self.engine_path = cache / _trt_cache_key(onnx_bytes, gpu, trt.__version__, self.max_batch)
        runtime = trt.Runtime(self._logger)
        engine = None
        if self.engine_path.is_file():
            engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
            if engine is None:
                log.warning("tensorrt: cached engine %s unusable, rebuilding", self.engine_path)
        if engine is None:
            plan = self._build(onnx_bytes)
            engine = runtime.deserialize_cuda_engine(plan)
            try:
                cache.mkdir(parents=True, exist_ok=True)
                tmp = self.engine_path.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_bytes(plan)
                tmp.replace(self.engine_path)
            except OSError as exc:
                log.warning("tensorrt: cannot cache engine in %s (%s); it will be rebuilt next time", cache, exc)
        if engine is None:
            raise EngineUnavailable("tensorrt: engine deserialisation failed")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.name = "tensorrt"
        self.device = "cuda"
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._input = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _build(self, onnx_bytes: bytes) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineUnavailable(f"tensorrt: ONNX parse failed: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
        if getattr(builder, "platform_has_fast_fp16", True):
            config.set_flag(trt.BuilderFlag.FP16)
            config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            # ONNX node names carry the torch module path ("/features/backbone/blocks.3/..."):
            # only the backbone runs in FP16; float layers after it stay FP32
            for i in range(network.num_layers):
                layer = network.get_layer(i)
                if "/backbone/" in layer.name:
                    continue
                outs = [layer.get_output(j) for j in range(layer.num_outputs)]
                if outs and all(o.dtype in (trt.float32, trt.float16) for o in outs):
                    layer.precision = trt.float32
                    for j in range(layer.num_outputs):
                        layer.set_output_type(j, trt.float32)
        inp = network.get_input(0)
        c, h, w = inp.shape[1:]
        profile = builder.create_optimization_profile()
        opt = min(self.max_batch, 8)
        profile.set_shape(inp.name, (1, c, h, w), (opt, c, h, w), (self.max_batch, c, h, w))
        config.add_optimization_profile(profile)
        log.info("tensorrt: building engine (FP16, batch 1..%d); this takes a minute, once", self.max_batch)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineUnavailable("tensorrt: engine build failed")
        return bytes(plan)

    def _run_batch(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        n = len(images)
        x = torch.from_numpy(images).to("cuda", non_blocking=True).permute(0, 3, 1, 2).float().contiguous()
        self.context.set_input_shape(self._input, tuple(x.shape))
        self.context.set_tensor_address(self._input, x.data_ptr())
        outs = []
        for name in self._outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=torch.float32, device="cuda")
            self.context.set_tensor_address(name, t.data_ptr())
            outs.append(t)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("tensorrt: execute_async_v3 failed")
        stream.synchronize()
        by_name = dict(zip(self._outputs, outs))
        maps = by_name.get("maps", outs[0]).cpu().numpy()
        scores = by_name.get("scores", outs[-1]).cpu().numpy()
        assert maps.shape[0] == n
        return maps, scores


# ---------------------------------------------------------------------------------------------
def _make(name: str, model: Any, onnx_path: Path | None, threads: int, max_batch: int) -> _BaseEngine:
    size = model.input_size
    if name in ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu") and (onnx_path is None or not Path(onnx_path).is_file()):
        raise EngineUnavailable(f"no ONNX export{f' at {onnx_path}' if onnx_path else ''}")
    if name == "tensorrt":
        return TensorRTEngine(onnx_path, size, max_batch)  # type: ignore[arg-type]
    if name == "onnxruntime-cuda":
        return OnnxRuntimeEngine(onnx_path, size, "cuda", threads, max_batch)  # type: ignore[arg-type]
    if name == "onnxruntime-cpu":
        return OnnxRuntimeEngine(onnx_path, size, "cpu", threads, max_batch)  # type: ignore[arg-type]
    if name == "torch-cuda":
        return TorchEngine(model, "cuda", threads, max_batch)
    if name == "torch-cpu":
        return TorchEngine(model, "cpu", threads, max_batch)
    raise ValueError(name)


def select_engine(model: Any, onnx_path: Path | None, preference: str = "auto", threads: int = 0,
                  max_batch: int = 16) -> Engine:
    """The best engine present for ``model`` (and its ONNX export, when there is one).

    ``preference``: "auto" (the whole chain), a family ("tensorrt", "onnxruntime", "torch") or
    one engine name (see ENGINE_NAMES). An explicit preference none of whose engines can run
    raises UserError saying why; "auto" always ends at torch CPU.
    """
    if preference not in PREFERENCES:
        raise UserError(f"engine preference {preference!r} unknown (choose from {', '.join(PREFERENCES)})")
    skipped: dict[str, str] = {}
    for name in PREFERENCES[preference]:
        try:
            engine = _make(name, model, Path(onnx_path) if onnx_path else None, threads, max_batch)
        except EngineUnavailable as exc:
            skipped[name] = str(exc)
            continue
        except Exception as exc:  # a broken provider must not take the worker down: try the next
            log.warning("engine %s failed to start: %s: %s", name, type(exc).__name__, exc)
            skipped[name] = f"failed to start ({type(exc).__name__}: {exc})"
            continue
        engine.skipped = skipped
        engine.reason = (f"preference {preference}: first available"
                         + (f"; skipped {', '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else ""))
        log.info("engine: chose %s for %s (%s)", engine.name, getattr(model, "kind", "model"), engine.reason)
        return engine
    detail = "; ".join(f"{k}: {v}" for k, v in skipped.items())
    raise UserError(f"engine preference {preference!r}: none available ({detail})")


def available_engines(model: Any, onnx_path: Path | None, threads: int = 0, max_batch: int = 16,
                      ) -> tuple[list[_BaseEngine], dict[str, str]]:
    """Every engine that starts here (for parity tests and the benchmark), and why others don't."""
    engines, missing = [], {}
    for name in ENGINE_NAMES:
        try:
            engines.append(_make(name, model, Path(onnx_path) if onnx_path else None, threads, max_batch))
        except EngineUnavailable as exc:
            missing[name] = str(exc)
    return engines, missing
