"""Dense engines behind one interface, looked up by backend name and imported lazily.

    engine = load_engine("onnx", version_dir / "engine/user_tower.onnx")
    outputs = engine.run({"user_id": pooled_a, "history": pooled_b})   # {output name: array}

``onnx`` runs ONNX Runtime (CUDA execution provider first when onnxruntime-gpu sees a GPU,
otherwise CPU); ``tensorrt`` runs a serialised TensorRT engine (``.plan``) with CuPy device
buffers. Each backend imports its library only when chosen and says what to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EngineUnavailable(RuntimeError):
    """The backend's library is missing or cannot run here; the message says what to install."""


class OnnxRuntimeEngine:
    backend = "onnx"

    def __init__(self, path: Path, *, threads: int = 0, providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise EngineUnavailable("the onnx backend needs onnxruntime: pip install onnxruntime") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads would otherwise spin after each run, taking a core from the
        # gRPC event loop between batches (the server runs many small runs).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outputs))


class TensorRtEngine:
    """A TensorRT ``.plan``: deserialised once, run on its own CUDA stream with CuPy buffers.

    Inputs may be NumPy arrays (copied to the device on the engine's stream) or CuPy arrays
    (used in place); outputs come back as NumPy. The GPU serving path keeps them on the
    device instead (``run_device``: CuPy in, CuPy out, on the caller's stream).
    """

    backend = "tensorrt"

    def __init__(self, path: Path, *, device: int = 0, threads: int = 0, providers=None):
        try:
            import cupy as cp
            import tensorrt as trt
        except ImportError as e:
            raise EngineUnavailable(
                f"the tensorrt backend needs the tensorrt and cupy packages ({e.name} is missing): "
                "pip install tensorrt cupy-cuda12x") from e
        try:
            if cp.cuda.runtime.getDeviceCount() <= device:
                raise EngineUnavailable(f"the tensorrt backend needs CUDA device {device}; none is visible")
        except cp.cuda.runtime.CUDARuntimeError as e:
            raise EngineUnavailable(f"the tensorrt backend needs a CUDA GPU: {e}") from e
        self._cp, self._trt = cp, trt
        self._device = cp.cuda.Device(device)
        with self._device:
            self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self._engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
            if self._engine is None:
                raise EngineUnavailable(f"{path}: TensorRT cannot deserialise it (built by another TensorRT "
                                        "version or for another GPU?)")
            self._context = self._engine.create_execution_context()
            self._stream = cp.cuda.Stream(non_blocking=True)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self.providers = [f"TensorRT {trt.__version__}"]

    def run(self, feeds: dict) -> dict[str, np.ndarray]:
        cp = self._cp
        with self._device, self._stream:
            inputs = {n: cp.ascontiguousarray(cp.asarray(feeds[n], dtype=cp.float32)) for n in self.input_names}
            for name, array in inputs.items():
                self._context.set_input_shape(name, array.shape)
                self._context.set_tensor_address(name, array.data.ptr)
            outputs = {}
            for name in self.output_names:
                outputs[name] = cp.empty(tuple(self._context.get_tensor_shape(name)), dtype=cp.float32)
                self._context.set_tensor_address(name, outputs[name].data.ptr)
            if not self._context.execute_async_v3(self._stream.ptr):
                raise RuntimeError("TensorRT execution failed")
            result = {name: cp.asnumpy(array, stream=self._stream) for name, array in outputs.items()}
            self._stream.synchronize()
        return result

    def run_device(self, inputs: dict, stream) -> dict:
        """Device to device on ``stream`` (a ``cupy.cuda.Stream`` of this engine's device): inputs
        are C-contiguous float32 CuPy arrays, outputs CuPy arrays allocated on that stream.
        Nothing is copied to the host and nothing waits: the caller orders the work on the
        stream and synchronises when it needs the results (the GPU serving path, server/gpu.py).
        Not thread-safe (one execution context): callers serialise runs."""
        cp = self._cp
        with self._device, stream:
            for name in self.input_names:
                array = inputs[name]
                if array.dtype != cp.float32 or not array.flags.c_contiguous:
                    raise ValueError(f"TensorRT input {name!r} must be a C-contiguous float32 CuPy array")
                self._context.set_input_shape(name, tuple(array.shape))
                self._context.set_tensor_address(name, array.data.ptr)
            outputs = {}
            for name in self.output_names:
                outputs[name] = cp.empty(tuple(self._context.get_tensor_shape(name)), dtype=cp.float32)
                self._context.set_tensor_address(name, outputs[name].data.ptr)
            if not self._context.execute_async_v3(stream.ptr):
                raise RuntimeError("TensorRT execution failed")
        return outputs


_BACKENDS = {"onnx": OnnxRuntimeEngine, "tensorrt": TensorRtEngine}


def load_engine(backend: str, path: Path, **options):
    try:
        cls = _BACKENDS[backend]
    except KeyError:
        raise EngineUnavailable(f"unknown engine backend {backend!r} (known: {', '.join(_BACKENDS)})") from None
    return cls(Path(path), **options)
