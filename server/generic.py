"""Generic models: any ONNX model (CV, NLP, time series...) served as is, like on Triton.

    recserve publish model.onnx --repository models --model resnet [--sample inputs.npz]
    version = publish_onnx(Path("model.onnx"), Path("models"), "resnet")
    model = GenericModel.load(Path("models/resnet/1"))   # files, checksums, signature, golden
    outputs = model.run({"image": batch})                # {output name: array}

A generic version is ``kind: "generic"`` in its manifest (architecture.md section 5):

    engine/model.onnx        the model, copied from the published file
    golden/request-0.npz     a sample input and the outputs ONNX Runtime computed for it
    manifest.json            signature (inputs/outputs: name, dtype, shape with -1 for a
                             dynamic dimension), engines, files with sha256, golden requests

The signature is read from the ONNX file by ONNX Runtime when publishing and checked
against the engine again at every load. Dtypes are NumPy names plus ``string`` (an ONNX
string tensor; BYTES on the KServe wire). Generic models have no Recommend pipeline: they
are served by ``inference.GRPCInferenceService/ModelInfer`` (server/kserve.py).
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recserve.server import repository
from recserve.server.engines import EngineUnavailable, load_engine
from recserve.server.repository import RepositoryError, read_manifest, verify_files

ENGINE_FILE = "engine/model.onnx"
GOLDEN_DIR = "golden"
# A golden output matches when |got - expected| <= atol + rtol * |expected| (floats; other
# dtypes must be equal). float16 outputs get at least FP16_TOLERANCE for both.
GOLDEN_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
FP16_TOLERANCE = 1e-3
CPU_ONLY = {"providers": ["CPUExecutionProvider"]}

# Manifest dtype -> NumPy dtype. "string" tensors are NumPy object arrays of str.
DTYPES = {name: np.dtype(name) for name in (
    "bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
    "float16", "float32", "float64")}
DTYPES["string"] = np.dtype(object)
_ORT_TYPES = {"tensor(bool)": "bool", "tensor(float16)": "float16", "tensor(float)": "float32",
              "tensor(double)": "float64", "tensor(string)": "string",
              **{f"tensor({n})": n for n in ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32",
                                               "int64")}}


def onnx_signature(session, where: str) -> dict:
    """{"inputs": [...], "outputs": [...]} of an ONNX Runtime session: name, dtype and
    shape (-1 for a dynamic or symbolic dimension). An unsupported tensor type (bfloat16,
    sequences, maps...) is a RepositoryError naming the tensor."""

    def tensors(args, kind: str) -> list[dict]:
        out = []
        for a in args:
            dtype = _ORT_TYPES.get(a.type)
            if dtype is None:
                raise RepositoryError(f"{where}: {kind} {a.name!r} has type {a.type}, which recserve does not "
                                      f"serve (supported: {', '.join(sorted(_ORT_TYPES))})")
            shape = [d if isinstance(d, int) and d >= 0 else -1 for d in (a.shape or [])]
            out.append({"name": a.name, "dtype": dtype, "shape": shape})
        return out

    return {"inputs": tensors(session.get_inputs(), "input"), "outputs": tensors(session.get_outputs(), "output")}


def is_input_error(exc: BaseException) -> bool:
    """An engine error caused by the request's values (ONNX Runtime's INVALID_ARGUMENT:
    e.g. an index out of a Gather's range), not by the server."""
    return type(exc).__name__ == "InvalidArgument" and type(exc).__module__.startswith("onnxruntime")


@dataclass
class GenericModel:
    version_dir: Path
    manifest: dict
    engine: object

    kind = "generic"

    @classmethod
    def load(cls, version_dir: Path, *, backend: str = "onnx", verify: bool = True,
             engine_options: Mapping | None = None) -> GenericModel:
        version_dir = Path(version_dir)
        manifest = read_manifest(version_dir)
        if manifest["kind"] != "generic":
            raise RepositoryError(f"{version_dir}: kind is {manifest['kind']!r}, not 'generic'")
        missing = [k for k in ("signature", "engines") if k not in manifest]
        if missing:
            raise RepositoryError(f"{version_dir / repository.MANIFEST}: missing {', '.join(missing)}")
        _check_manifest_signature(manifest["signature"], version_dir)
        if verify:
            verify_files(version_dir, manifest)
        engines = manifest["engines"]
        if backend not in engines:
            raise RepositoryError(f"{version_dir}: no {backend!r} engine (has: {', '.join(engines)})")
        if backend != "onnx":
            raise EngineUnavailable(f"generic models run on ONNX Runtime only (not {backend})")
        path = version_dir / engines[backend]["file"]
        if not path.is_file():
            raise RepositoryError(f"{path}: missing")
        try:
            engine = load_engine(backend, path, **(engine_options or {}))
        except EngineUnavailable:
            raise
        except Exception as e:  # ONNX Runtime's own exceptions: a corrupt or unsupported model
            raise RepositoryError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[-1]})") from None
        actual = onnx_signature(engine.session, str(path))
        if actual != _normalised(manifest["signature"]):
            raise RepositoryError(f"{path}: engine signature {_describe(actual)} does not match the manifest "
                                  f"signature {_describe(manifest['signature'])}")
        return cls(version_dir, manifest, engine)

    @property
    def signature(self) -> dict:
        return self.manifest["signature"]

    @property
    def platform(self) -> str:
        return "onnxruntime_onnx"

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.engine.run(dict(feeds))

    def check_golden(self) -> None:
        """Reproduce every golden request of the manifest (none is fine for a generic
        model); a mismatch raises RepositoryError naming the request and the output."""
        tolerance = {**GOLDEN_TOLERANCE, **self.manifest.get("golden_tolerance", {})}
        for i, g in enumerate(self.manifest.get("golden", [])):
            where = f"{self.version_dir}: golden request {i}"
            feeds, expected = read_golden(self.version_dir / g["file"], g["inputs"], g["outputs"], where)
            got = self.run(_as_feeds(feeds, self.signature))
            for name, want in expected.items():
                problem = _mismatch(got[name], want, tolerance)
                if problem:
                    raise RepositoryError(f"{where}: output {name!r} {problem}")


def _check_manifest_signature(signature, version_dir: Path) -> None:
    try:
        for kind in ("inputs", "outputs"):
            for t in signature[kind]:
                if t["dtype"] not in DTYPES or not all(isinstance(d, int) and d >= -1 for d in t["shape"]):
                    raise ValueError(t)
    except (KeyError, TypeError, ValueError) as e:
        raise RepositoryError(f"{version_dir / repository.MANIFEST}: bad signature entry {e}") from None


def _normalised(signature: Mapping) -> dict:
    return {kind: [{"name": t["name"], "dtype": t["dtype"], "shape": list(t["shape"])} for t in signature[kind]]
            for kind in ("inputs", "outputs")}


def _describe(signature: Mapping) -> str:
    def side(kind):
        return ", ".join(f"{t['name']}:{t['dtype']}{list(t['shape'])}" for t in signature[kind])
    return f"(inputs {side('inputs')}; outputs {side('outputs')})"


def _as_feeds(arrays: Mapping[str, np.ndarray], signature: Mapping) -> dict[str, np.ndarray]:
    """String inputs as object arrays of str (ONNX Runtime turns bytes objects into "b'...'")."""
    strings = {t["name"] for t in signature["inputs"] if t["dtype"] == "string"}
    return {n: (a.astype(str).astype(object) if n in strings else a) for n, a in arrays.items()}


def _mismatch(got: np.ndarray, want: np.ndarray, tolerance: Mapping) -> str:
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"has shape {list(got.shape)}, expected {list(want.shape)}"
    if want.dtype.kind in "US":
        return "" if np.array_equal(got.astype(str), want.astype(str)) else "differs"
    if got.dtype != want.dtype:
        return f"has dtype {got.dtype}, expected {want.dtype}"
    if want.dtype.kind != "f":
        return "" if np.array_equal(got, want) else "differs"
    rtol, atol = tolerance["rtol"], tolerance["atol"]
    if want.dtype == np.float16:
        rtol, atol = max(rtol, FP16_TOLERANCE), max(atol, FP16_TOLERANCE)
    g, w = got.astype(np.float64), want.astype(np.float64)
    bad = ~(np.isclose(g, w, rtol=rtol, atol=atol) | (np.isnan(g) & np.isnan(w)))
    if bad.any():
        err = float(np.nanmax(np.abs(g - w)))
        return f"differs by up to {err:.3g} (rtol {rtol:g}, atol {atol:g}) at {int(bad.sum())} element(s)"
    return ""


def read_golden(path: Path, inputs: list[str], outputs: list[str], where: str):
    """({input name: array}, {output name: array}) from a golden .npz (keys input_<i>,
    output_<i> in the manifest's order: tensor names need not be valid file names)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return ({n: data[f"input_{i}"] for i, n in enumerate(inputs)},
                    {n: data[f"output_{i}"] for i, n in enumerate(outputs)})
    except FileNotFoundError:
        raise RepositoryError(f"{path}: missing") from None
    except (KeyError, ValueError, OSError, EOFError) as e:
        raise RepositoryError(f"{where}: {path.name} is not a readable golden file ({e})") from None


# ---- publishing ---------------------------------------------------------------------------

def sample_inputs(signature: Mapping, seed: int = 0) -> dict[str, np.ndarray]:
    """A deterministic input for each tensor of the signature, dynamic dimensions 1:
    floats standard normal, integers 0 (a valid index for most embedding lookups),
    booleans False, strings "sample"."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in signature["inputs"]:
        shape = tuple(1 if d < 0 else d for d in t["shape"])
        dtype = DTYPES[t["dtype"]]
        if t["dtype"] == "string":
            out[t["name"]] = np.full(shape, "sample", dtype=object)
        elif dtype.kind == "f":
            out[t["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            out[t["name"]] = np.zeros(shape, dtype=dtype)
    return out


def _load_sample(path: Path, signature: Mapping) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError) as e:
        raise RepositoryError(f"{path}: not a readable .npz of input arrays ({e})") from None
    names = [t["name"] for t in signature["inputs"]]
    if sorted(arrays) != sorted(names):
        raise RepositoryError(f"{path}: holds arrays {sorted(arrays)}, the model's inputs are {sorted(names)}")
    feeds = {}
    for t in signature["inputs"]:
        a = arrays[t["name"]]
        if t["dtype"] == "string":
            if a.dtype.kind not in "US":
                raise RepositoryError(f"{path}: input {t['name']!r} must hold strings, not {a.dtype}")
            a = a.astype(str).astype(object)
        elif a.dtype != DTYPES[t["dtype"]]:
            raise RepositoryError(f"{path}: input {t['name']!r} is {a.dtype}, the model wants {t['dtype']}")
        feeds[t["name"]] = a
    return feeds


def publish_onnx(onnx_path: Path, repo: Path, model_name: str, *, sample: Path | None = None,
                 golden: bool = True, log=print) -> int:
    """Publish an ONNX file as a new generic version of ``model_name`` (atomically, see
    server/repository.py): the file, its signature as ONNX Runtime reads it, sha256 of
    every file and, unless ``golden`` is False, one golden request — ``sample`` (an .npz
    with one array per input) or a generated input — with the outputs ONNX Runtime (CPU)
    computes for it. The server reproduces it before the version takes traffic."""
    import onnxruntime as ort

    repository.validate_model_name(model_name)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path}: no such file")

    def build(tmp: Path, version: int) -> None:
        (tmp / "engine").mkdir()
        shutil.copyfile(onnx_path, tmp / ENGINE_FILE)
        try:
            session = ort.InferenceSession(str(tmp / ENGINE_FILE), providers=CPU_ONLY["providers"])
        except Exception as e:
            raise RepositoryError(f"{onnx_path}: ONNX Runtime cannot load it "
                                  f"({str(e).strip().splitlines()[-1]})") from None
        signature = onnx_signature(session, str(onnx_path))
        entries = []
        if golden:
            feeds = _load_sample(Path(sample), signature) if sample else sample_inputs(signature)
            try:
                outputs = session.run(None, feeds)
            except Exception as e:
                hint = "" if sample else " (a generated input; pass --sample inputs.npz or --no-golden)"
                raise RepositoryError(f"{onnx_path}: ONNX Runtime failed on the sample input{hint}: "
                                      f"{str(e).strip().splitlines()[-1]}") from None
            (tmp / GOLDEN_DIR).mkdir()
            names_in = [t["name"] for t in signature["inputs"]]
            names_out = [t["name"] for t in signature["outputs"]]
            arrays = {f"input_{i}": _storable(feeds[n]) for i, n in enumerate(names_in)}
            arrays.update({f"output_{i}": _storable(o) for i, o in enumerate(outputs)})
            np.savez(tmp / GOLDEN_DIR / "request-0.npz", **arrays)
            entries.append({"file": f"{GOLDEN_DIR}/request-0.npz", "inputs": names_in, "outputs": names_out})
        manifest = {
            "schema_version": repository.MANIFEST_SCHEMA_VERSION,
            "kind": "generic",
            "model": model_name,
            "version": version,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "source": onnx_path.name,
            "signature": signature,
            "engines": {"onnx": {"file": ENGINE_FILE}},
            "files": repository.file_entries(tmp),
            "golden": entries,
            "golden_tolerance": dict(GOLDEN_TOLERANCE),
        }
        repository.write_json(tmp / repository.MANIFEST, manifest)
        GenericModel.load(tmp, engine_options=CPU_ONLY).check_golden()  # what the server will do
        log(f"{model_name} version {version}: {_describe(signature)}"
            f"{', 1 golden request' if entries else ', no golden request'}")

    return repository.publish_version(Path(repo), model_name, build)


def _storable(a: np.ndarray) -> np.ndarray:
    """Object arrays of str (string tensors) as NumPy unicode arrays: .npz without pickle."""
    a = np.asarray(a)
    return a.astype(str) if a.dtype == object else a
