"""TensorRT engine (.plan) for an exported ONNX tower, built and checked with the TensorRT API.

    reason = unavailable_reason()          # None when tensorrt imports and a GPU is present
    build_plan(onnx_path, plan_path, inputs={"user_id": 64, "history": 64}, max_batch=1024)
    out = run_plan(plan_path, {"user_id": a, "history": b})   # NumPy in, NumPy out

The plan has one optimisation profile over batch sizes 1..max_batch (optimum at
``opt_batch``) and may use FP16 kernels; export compares its outputs with ONNX Runtime.
Device buffers are torch CUDA tensors (torch is already the trainer's dependency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def unavailable_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install tensorrt)"
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


def run_plan(plan_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    context = engine.create_execution_context()
    buffers, outputs = {}, []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            buffers[name] = torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32)).cuda()
            context.set_input_shape(name, tuple(buffers[name].shape))
        else:
            outputs.append(name)
    for name in outputs:
        shape = tuple(context.get_tensor_shape(name))
        buffers[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
    for name, tensor in buffers.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError(f"TensorRT execution of {plan_path} failed")
    stream.synchronize()
    return {name: buffers[name].cpu().numpy() for name in outputs}
