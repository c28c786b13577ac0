"""Small ONNX models built with onnx.helper for the KServe tests (no files shipped).

    path = build(tmp_path, "text")        # writes tmp_path / "text.onnx"
    session = reference_session(path)     # ONNX Runtime on the CPU: the expected outputs

dense  x FP32 [-1, 4] -> y FP32 [-1, 3] = relu(x W + b), label INT64 [-1] = argmax(y)
half   x FP16 [-1, 4] -> y FP16 [-1, 4] = 2 x, total FP32 [-1] = sum(x) per row
text   text BYTES [-1], x FP32 [-1, 4] -> tagged BYTES [-1] = text + "!",
       match BOOL [-1] = text matches "h.*", y FP16 [-1, 4] = fp16(2 x)
typed  one input per typed-contents datatype (INT8 UINT16 INT32 INT64 UINT64 BOOL FP64),
       each returned by Identity as <name>_out
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10 - 0.5
BIAS = np.array([0.1, -0.2, 0.3], dtype=np.float32)
TYPED = {"i8": "INT8", "u16": "UINT16", "i32": "INT32", "i64": "INT64", "u64": "UINT64", "flag": "BOOL",
         "f64": "FP64"}


def _model(name: str, scale: float = 1.0):
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    def vi(n, t, shape):
        return helper.make_tensor_value_info(n, t, shape)

    if name == "dense":
        inits = [numpy_helper.from_array(WEIGHTS * scale, "W"), numpy_helper.from_array(BIAS, "b")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["z"]),
                 helper.make_node("Relu", ["z"], ["y"]),
                 helper.make_node("ArgMax", ["y"], ["label"], axis=1, keepdims=0)]
        graph = helper.make_graph(nodes, name, [vi("x", T.FLOAT, ["batch", 4])],
                                  [vi("y", T.FLOAT, ["batch", 3]), vi("label", T.INT64, ["batch"])], inits)
        opset = 17
    elif name == "half":
        inits = [numpy_helper.from_array(np.array(2, np.float16), "two"),
                 numpy_helper.from_array(np.array([1], np.int64), "axes")]
        nodes = [helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("Cast", ["x"], ["x32"], to=T.FLOAT),
                 helper.make_node("ReduceSum", ["x32", "axes"], ["total"], keepdims=0)]
        graph = helper.make_graph(nodes, name, [vi("x", T.FLOAT16, ["batch", 4])],
                                  [vi("y", T.FLOAT16, ["batch", 4]), vi("total", T.FLOAT, ["batch"])], inits)
        opset = 17
    elif name == "text":
        inits = [helper.make_tensor("bang", T.STRING, [], [b"!"]),
                 numpy_helper.from_array(np.array(2, np.float32), "two")]
        nodes = [helper.make_node("StringConcat", ["text", "bang"], ["tagged"]),
                 helper.make_node("RegexFullMatch", ["text"], ["match"], pattern="h.*"),
                 helper.make_node("Mul", ["x", "two"], ["x2"]), helper.make_node("Cast", ["x2"], ["y"], to=T.FLOAT16)]
        graph = helper.make_graph(nodes, name, [vi("text", T.STRING, ["n"]), vi("x", T.FLOAT, ["batch", 4])],
                                  [vi("tagged", T.STRING, ["n"]), vi("match", T.BOOL, ["n"]),
                                   vi("y", T.FLOAT16, ["batch", 4])], inits)
        opset = 20
    elif name == "typed":
        types = {"INT8": T.INT8, "UINT16": T.UINT16, "INT32": T.INT32, "INT64": T.INT64, "UINT64": T.UINT64,
                 "BOOL": T.BOOL, "FP64": T.DOUBLE}
        nodes = [helper.make_node("Identity", [n], [f"{n}_out"]) for n in TYPED]
        graph = helper.make_graph(nodes, name, [vi(n, types[t], ["n"]) for n, t in TYPED.items()],
                                  [vi(f"{n}_out", types[t], ["n"]) for n, t in TYPED.items()])
        opset = 17
    else:
        raise ValueError(name)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9  # what ONNX Runtime >= 1.17 reads
    return model


def build(directory: Path, name: str, scale: float = 1.0) -> Path:
    """Write model ``name`` (``scale`` changes dense's weights: a different version)."""
    import onnx

    model = _model(name, scale)
    onnx.checker.check_model(model)
    path = Path(directory) / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def reference_session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
