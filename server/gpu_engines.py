"""Dense engines on the GPU for the device pipeline (server/gpu.py): CuPy arrays in, CuPy arrays
out, on the pipeline's one CUDA stream, nothing copied to the host and nothing waited for.

    names = engine_candidates("auto", has_plan=True)        # ["tensorrt", "onnx-cuda", "torch"]
    name = select_engine("auto", True, {"tensorrt": "not installed", "onnx-cuda": None})  # "onnx-cuda"
    engine = load_device_engine(version_dir, manifest, "auto", device=0, stream=stream)
    outputs = engine.run_device({"user_id": pooled, "history": pooled2}, stream)

Backends, in the order ``auto`` tries them:
  tensorrt   the version's ``.plan`` through ``TensorRtEngine.run_device`` (needs tensorrt + a plan)
  onnx-cuda  the ONNX user tower on ONNX Runtime's CUDA execution provider, inputs and outputs
             bound to device memory (IOBinding), ORT told to use the pipeline's stream and not
             to synchronise at the end of a run (needs onnxruntime-gpu)
  torch      the ONNX user tower converted to a torch module with onnx2torch, run on the
             pipeline's stream (torch.cuda.ExternalStream; tensors exchanged by DLPack). torch is
             imported only here, only in this mode: elsewhere the server never imports it
             (docs/architecture.md notes this deviation from the design guide's layout).
Each backend's library is imported lazily; a missing one is an ``EngineUnavailable`` saying
what to install. ``auto`` takes the first that loads; an explicit choice takes that one or fails.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from recserve.server.engines import EngineUnavailable

log = logging.getLogger(__name__)

ORDER = ("tensorrt", "onnx-cuda", "torch")
INSTALL = {
    "tensorrt": "pip install tensorrt-cu13 (and export the version with --backend onnx,tensorrt)",
    "onnx-cuda": "pip install onnxruntime-gpu",
    "torch": "pip install torch onnx2torch torchvision (torch built with CUDA)",
}
NO_PLAN = "the version has no TensorRT plan (export it with --backend onnx,tensorrt)"


# ---- selection (pure: tested without a GPU) ------------------------------------------

def engine_candidates(requested: str, has_plan: bool) -> list[str]:
    """Backends to try, best first: ``auto`` -> TensorRT (only with a plan), ONNX Runtime CUDA,
    torch; otherwise just the one requested."""
    if requested == "auto":
        return [n for n in ORDER if n != "tensorrt" or has_plan]
    if requested not in ORDER:
        raise EngineUnavailable(f"unknown gpu_engine {requested!r} (known: auto, {', '.join(ORDER)})")
    return [requested]


def unavailable_message(requested: str, has_plan: bool, reasons: Mapping[str, str]) -> str:
    """One line: why no GPU dense engine can run, and what to install."""
    if requested != "auto":
        why = reasons.get(requested) or (NO_PLAN if requested == "tensorrt" and not has_plan else "unavailable")
        return f"gpu_engine {requested}: {why}; {INSTALL[requested]}"
    tried = "; ".join(f"{n}: {reasons.get(n, NO_PLAN)}" for n in ORDER)
    return (f"no dense engine can run on the GPU ({tried}): install onnxruntime-gpu, or torch with CUDA "
            f"+ onnx2torch + torchvision, or tensorrt-cu13 for a version exported with a TensorRT plan")


def select_engine(requested: str, has_plan: bool, why_not: Mapping[str, str | None]) -> str:
    """The backend ``load_device_engine`` would try first, given why each backend cannot run
    here (None: it can). Raises EngineUnavailable with ``unavailable_message``."""
    reasons = {}
    for name in engine_candidates(requested, has_plan):
        if name == "tensorrt" and not has_plan:
            reasons[name] = NO_PLAN
            continue
        why = why_not.get(name, "not probed")
        if why is None:
            return name
        reasons[name] = why
    raise EngineUnavailable(unavailable_message(requested, has_plan, reasons))


# ---- probing (imports the libraries; cheap checks first) -----------------------------

def why_not(name: str, device: int) -> str | None:
    """Why backend ``name`` cannot run on CUDA device ``device`` here; None when it can."""
    if name == "tensorrt":
        for package in ("tensorrt", "cupy"):
            if importlib.util.find_spec(package) is None:
                return f"the {package} package is not installed"
        return None
    if name == "onnx-cuda":
        try:
            import onnxruntime as ort
        except ImportError:
            return "onnxruntime is not installed"
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return "onnxruntime has no CUDAExecutionProvider (the CPU-only onnxruntime package is installed)"
        return None
    if name == "torch":
        for package in ("torch", "onnx2torch", "torchvision"):
            if importlib.util.find_spec(package) is None:
                return f"the {package} package is not installed"
        import torch

        if not torch.cuda.is_available():
            return "torch is installed without CUDA support (or sees no GPU)"
        if device >= torch.cuda.device_count():
            return f"torch sees {torch.cuda.device_count()} CUDA device(s), not cuda:{device}"
        return None
    raise EngineUnavailable(f"unknown gpu_engine {name!r}")


# ---- engines ---------------------------------------------------------------------------

class OnnxCudaEngine:
    """ONNX Runtime, CUDA execution provider, device-bound inputs/outputs on the caller's stream."""

    backend = "onnx-cuda"
    manifest_backend = "onnx"  # golden tolerance: the ONNX reference's

    def __init__(self, path: Path, *, device: int, stream):
        import onnxruntime as ort

        self._device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cuda = {"device_id": str(device),
                # Kernels go to the pipeline's stream (ORT >= 1.17), so they are ordered after
                # the lookup and before the top-k without any host wait.
                "has_user_compute_stream": "1", "user_compute_stream": str(stream.ptr),
                # Full float32 GEMMs: TF32 would move user vectors by ~1e-3, past the golden 1e-5.
                "use_tf32": "0"}
        self.session = ort.InferenceSession(str(path), sess_options=options,
                                            providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise EngineUnavailable("onnxruntime did not enable its CUDAExecutionProvider (its log says why)")
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._out_dims = {}
        for o in self.session.get_outputs():
            dims = list(o.shape)[1:]
            if not all(isinstance(d, int) and d > 0 for d in dims):
                raise EngineUnavailable(f"{path}: output {o.name!r} has shape {o.shape}; the GPU path needs "
                                        "every dimension but the batch fixed")
            self._out_dims[o.name] = tuple(dims)
        self._run_options = ort.RunOptions()
        # Run() would otherwise synchronise the device at its end.
        self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def run_device(self, inputs: dict, stream) -> dict:
        import cupy as cp

        batch = int(inputs[self.input_names[0]].shape[0])
        binding = self.session.io_binding()
        for name in self.input_names:
            a = inputs[name]
            binding.bind_input(name, "cuda", self._device, np.float32, tuple(a.shape), a.data.ptr)
        outputs = {}
        with stream:
            for name in self.output_names:
                out = outputs[name] = cp.empty((batch, *self._out_dims[name]), dtype=cp.float32)
                binding.bind_output(name, "cuda", self._device, np.float32, out.shape, out.data.ptr)
        self.session.run_with_iobinding(binding, self._run_options)
        return outputs


def torch_module_from_onnx(path: Path):
    """(torch module in eval mode on the CPU, input names in call order, output names) for an
    ONNX file, converted by onnx2torch. Runs anywhere torch does (tested on the CPU)."""
    import onnx
    from onnx import version_converter
    from onnx2torch import convert

    model = onnx.load(str(path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset > 17:
        # onnx2torch 1.5 converts ReduceL2 (the tower's normalisation) only up to opset 17,
        # where axes are an attribute; ONNX's own version converter rewrites the model to 17.
        model = version_converter.convert_version(model, 17)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return convert(model).eval(), inputs, [o.name for o in model.graph.output]


class TorchEngine:
    """The ONNX user tower as a torch module (onnx2torch), on the caller's stream."""

    backend = "torch"
    manifest_backend = "onnx"

    def __init__(self, path: Path, *, device: int, stream):
        import torch

        module, self.input_names, self.output_names = torch_module_from_onnx(path)
        self._torch = torch
        self._device = torch.device("cuda", device)
        self.module = module.to(self._device)
        self._stream = torch.cuda.ExternalStream(stream.ptr, device=self._device)
        self.providers = [f"torch {torch.__version__} (onnx2torch)"]

    def run_device(self, inputs: dict, stream) -> dict:
        import cupy as cp

        torch = self._torch
        with torch.no_grad(), torch.cuda.stream(self._stream), stream:
            # DLPack on one stream: no copy and no wait (a consumer on another stream would
            # only get a device-side event wait).
            args = [torch.from_dlpack(inputs[n]) for n in self.input_names]
            out = self.module(*args)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {n: cp.ascontiguousarray(cp.from_dlpack(t.contiguous())) for n, t in zip(self.output_names, outs)}


class TensorRtDeviceEngine:
    """``TensorRtEngine`` (server/engines.py) through its device-to-device ``run_device``."""

    backend = "tensorrt"
    manifest_backend = "tensorrt"

    def __init__(self, path: Path, *, device: int, stream):
        from recserve.server.engines import TensorRtEngine

        self._engine = TensorRtEngine(path, device=device)
        self.input_names, self.output_names = self._engine.input_names, self._engine.output_names
        self.providers = self._engine.providers

    def run_device(self, inputs: dict, stream) -> dict:
        return self._engine.run_device(inputs, stream)


_CLASSES = {"tensorrt": TensorRtDeviceEngine, "onnx-cuda": OnnxCudaEngine, "torch": TorchEngine}


def load_device_engine(version_dir: Path, manifest: Mapping, requested: str, *, device: int, stream,
                       max_batch_size: int | None = None,
                       probe: Callable[[str, int], str | None] = why_not):
    """The first backend of ``engine_candidates`` that imports and loads; each one skipped is
    logged with its reason. EngineUnavailable (one line, what to install) when none does."""
    engines = manifest.get("engines", {})
    has_plan = "tensorrt" in engines
    reasons: dict[str, str] = {}
    for name in engine_candidates(requested, has_plan):
        if name == "tensorrt":
            if not has_plan:
                reasons[name] = NO_PLAN
                continue
            plan_batch = engines["tensorrt"].get("max_batch")
            if plan_batch is not None and max_batch_size is not None and max_batch_size > plan_batch:
                reasons[name] = f"its plan takes batches up to {plan_batch}, max_batch_size is {max_batch_size}"
                continue
        why = probe(name, device)
        if why is None:
            file = engines["tensorrt" if name == "tensorrt" else "onnx"]["file"]
            try:
                return _CLASSES[name](Path(version_dir) / file, device=device, stream=stream)
            except (EngineUnavailable, ImportError, NotImplementedError, RuntimeError) as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        reasons[name] = why
        if requested == "auto":
            log.info("%s: GPU dense engine %s not used (%s)", version_dir, name, why)
    raise EngineUnavailable(unavailable_message(requested, has_plan, reasons))
