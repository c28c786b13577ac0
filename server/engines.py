"""Dense engines behind one interface, looked up by backend name and imported lazily.

    engine = load_engine("onnx", version_dir / "engine/user_tower.onnx")
    outputs = engine.run({"user_id": pooled_a, "history": pooled_b})   # {output name: array}

``onnx`` runs ONNX Runtime (CUDA execution provider first when onnxruntime-gpu sees a GPU,
otherwise CPU). The TensorRT backend (``.plan``) arrives with the GPU serving path.
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


_BACKENDS = {"onnx": OnnxRuntimeEngine}


def load_engine(backend: str, path: Path, **options):
    try:
        cls = _BACKENDS[backend]
    except KeyError:
        raise EngineUnavailable(f"unknown engine backend {backend!r} (known: {', '.join(_BACKENDS)})") from None
    return cls(Path(path), **options)
