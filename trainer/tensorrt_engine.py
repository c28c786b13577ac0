"""TensorRT engine (.plan) for an exported ONNX tower, built and checked with the TensorRT API.

    reason = unavailable_reason()          # None when tensorrt and cupy import and a GPU is present
    build_plan(onnx_path, plan_path, inputs={"user_id": 64, "history": 64}, max_batch=1024)

The plan has one optimisation profile over batch sizes 1..max_batch (optimum at
``opt_batch``) and may use FP16 kernels. Export runs it with the server's own
``recserve.server.engines.TensorRtEngine`` and compares its outputs with ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path


def unavailable_reason() -> str | None:
    for package, hint in (("tensorrt", "pip install tensorrt"), ("cupy", "pip install cupy-cuda12x")):
        try:
            __import__(package)
        except ImportError:
            return f"the {package} Python package is not installed ({hint})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible (TensorRT builds and runs engines on a GPU)"
    return None


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_plan(onnx_path: Path, plan_path: Path, inputs: dict[str, int], *, max_batch: int = 1024,
               opt_batch: int = 64, fp16: bool = True) -> None:
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT >= 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if fp16 and builder.platform_has_fast_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for name, dim in inputs.items():
        profile.set_shape(name, (1, dim), (min(opt_batch, max_batch), dim), (max_batch, dim))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    Path(plan_path).write_bytes(bytes(serialized))
