"""verify_vllm: decode an exported folder and compare it with its IR, bit for bit.

What is compared, per packed linear:

1. **fields** (qexport's decoder, decode.py): codes, zero points and scales equal the IR's
   exactly (scales widened from the stored dtype to float32; GPTQ v1 zeros = stored + 1;
   symmetric GPTQ ``qzeros`` hold ``2**(b-1) - 1``; ``g_idx`` trivial).
2. **library** (compressed-tensors' ``PackedQuantizationCompressor.decompress``, CT folders
   only, when the library is importable and reads the folder's packing layout): the weight it
   decompresses in the model dtype equals the IR's float32 value rounded once to that dtype,
   and with scales widened to float32 it equals the IR's float32 value exactly.
   GPTQ: with ``gptqmodel=True`` (``qexport verify`` sets it) and a GPTQModel venv present
   (gptqmodel_decoder.py), transformers + GPTQModel load the folder on CPU with GPTQModel's
   ``TorchLinear`` kernel, and each module's ``dequantize_weight()`` equals the IR's float32 value
   rounded once to the dtype it returns (``gptqmodel.<dtype>``: float16, also in bfloat16 models,
   where GPTQModel holds the scales as float16).
3. **dense tensors** (embeddings, norms, lm_head, biases) equal the IR's float32 values cast to
   the model dtype; **adapter** ``lora_A``/``lora_B`` equal the IR's ``B``/``A`` exactly.

GPTQ folders without the GPTQModel venv (or with ``gptqmodel=False``, the Python API's default:
it costs a subprocess of ~10-50 s) skip step 2 and the report says so; their layout is also
pinned by golden words in the tests.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import VerifyError
from qexport.ir import QModel, QTensor

from .decode import Decoded, decode_ct, decode_gptq
from .hf_folder import TORCH_DTYPES, is_dense_only, module_of
from .peft import PEFT_PREFIX, adapter_dir
from .specs import format_of

__all__ = ["VerifyReport", "verify_vllm", "ct_library"]

_ODD_BITS = (3, 5, 6, 7)
#: the statement of what verify compares (this module's docstring, items 1-3)
COMPARED = (__doc__ or "").split("per packed linear:")[1].split("GPTQ folders")[0].strip()


@dataclass
class VerifyReport:
    """Result of :func:`verify_vllm`: one row per check, ``ok`` when all passed."""

    folder: str
    fmt: str
    dtype: str
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared: str = ""

    def __post_init__(self) -> None:
        self.compared = self.compared or COMPARED

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def add(self, tensor: str, check: str, ok: bool, detail: str = "") -> None:
        self.checks.append({"tensor": tensor, "check": check, "ok": bool(ok), "detail": detail})

    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["ok"]]

    def summary(self) -> str:
        kinds = sorted({c["check"] for c in self.checks})
        head = (f"{self.folder}: {self.fmt} {self.dtype}: {len(self.checks)} checks "
                f"({', '.join(kinds)}): {'all equal' if self.ok else 'MISMATCH'}")
        lines = [head] + [f"  FAIL {c['tensor']} [{c['check']}] {c['detail']}"
                          for c in self.failures()[:10]]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {"folder": self.folder, "format": self.fmt, "dtype": self.dtype, "ok": self.ok,
                "checks": self.checks, "notes": self.notes, "compared": self.compared}

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise VerifyError(self.summary())


def ct_library() -> Any | None:
    """The installed compressed-tensors module, or None."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors import PackedQuantizationCompressor  # noqa: F401
        return compressed_tensors
    except ImportError:
        return None


def _ct_scheme(qc: dict[str, Any], module: str) -> dict[str, Any] | None:
    for group in qc.get("config_groups", {}).values():
        for t in group.get("targets", []):
            if t == "Linear" or t == module or (t.startswith("re:")
                                                and re.match(t[3:], module)):
                return group
    return None


def _declared(fmt: str, qc: dict[str, Any], module: str) -> tuple[tuple[int, int, bool] | None,
                                                                   dict[str, Any] | None]:
    if fmt == "gptq":
        return (int(qc["bits"]), int(qc["group_size"]), bool(qc["sym"])), None
    if module in qc.get("ignore", []):
        return None, None
    g = _ct_scheme(qc, module)
    if g is None:
        return None, None
    w = g["weights"]
    return (int(w["num_bits"]), -1 if w.get("group_size") is None else int(w["group_size"]),
            bool(w["symmetric"])), g


def _eq(a: np.ndarray | None, b: np.ndarray | None) -> tuple[bool, str]:
    if a is None or b is None:
        return (a is None and b is None), "" if a is None and b is None else "one side missing"
    if a.shape != b.shape:
        return False, f"shape {list(a.shape)} vs {list(b.shape)}"
    diff = a != b
    if not diff.any():
        return True, ""
    i = tuple(np.argwhere(diff)[0])
    return False, f"{int(diff.sum())} differ, first at {list(i)}: {a[i]!r} vs {b[i]!r}"


def _check_fields(rep: VerifyReport, qt: QTensor, d: Decoded) -> None:
    for what, got, want in (("codes", d.codes, qt.codes), ("scales", d.scales, qt.grid.scales),
                            ("zeros", d.zeros, qt.grid.zeros)):
        ok, detail = _eq(got, want)
        rep.add(qt.name, f"fields.{what}", ok, detail)


def _check_library(rep: VerifyReport, qt: QTensor, t: dict[str, torch.Tensor], prefix: str,
                   group: dict[str, Any], dtype: torch.dtype, ir: torch.Tensor) -> None:
    """compressed-tensors' decompression of ``prefix`` equals ``ir`` (the IR's float32
    ``[out, in]`` values) in the checkpoint dtype and, with float32 scales, in float32."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    scheme = QuantizationScheme.model_validate(group)
    state = {k.split(".")[-1]: v for k, v in t.items() if k.rsplit(".", 1)[0] == prefix}
    got = PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
    ok, detail = _eq(got.float().numpy(), ir.to(dtype).float().numpy())
    rep.add(qt.name, f"library.{str(dtype).replace('torch.', '')}", ok and got.dtype == dtype,
            detail or ("" if got.dtype == dtype else f"dtype {got.dtype}"))
    state["weight_scale"] = state["weight_scale"].float()
    got32 = PackedQuantizationCompressor.decompress(dict(state), scheme)["weight"]
    ok, detail = _eq(got32.numpy(), ir.numpy())
    rep.add(qt.name, "library.float32", ok, detail)


def _library_usable(lib: Any, bits: int, layout: str) -> str | None:
    """None when the installed CT reads ``layout`` at ``bits``; else why not."""
    from packaging.version import Version
    lib_layout = "dense" if Version(lib.__version__) >= Version("0.18.0") else "word"
    if bits in _ODD_BITS and lib_layout != layout:
        return (f"compressed-tensors {lib.__version__} packs {bits}-bit codes in the "
                f"{lib_layout} layout, the folder holds {layout}: library check skipped")
    return None


def _preferred_layout(qc: dict[str, Any]) -> str:
    """CT packer layout implied by the config's ``version`` (dense from 0.18.0)."""
    from packaging.version import InvalidVersion, Version
    try:
        return "dense" if Version(str(qc.get("version", "0.18.0"))) >= Version("0.18.0") \
            else "word"
    except InvalidVersion:
        return "dense"


def _gptqmodel_decode(rep: VerifyReport, folder: Path) -> dict[str, np.ndarray] | None:
    """GPTQModel's dequantized weights of ``folder`` (keys ``f::<module>``); None, with a note,
    when no GPTQModel venv exists; a failed ``gptqmodel`` check when it could not load it."""
    from .gptqmodel_decoder import gptqmodel_python, run_gptqmodel
    if gptqmodel_python() is None:
        rep.notes.append("GPTQModel venv absent (tools/setup_gptqmodel.sh): GPTQModel check "
                         "skipped")
        return None
    try:
        res = run_gptqmodel([{"key": "f", "path": str(folder), "backend": "torch"}])
    except VerifyError as e:
        rep.add(str(folder), "gptqmodel", False, str(e))
        return {}
    if "f__error" in res:
        rep.add(str(folder), "gptqmodel", False, f"GPTQModel could not load it: {res['f__error']}")
        return {}
    rep.notes.append(f"GPTQModel kernels: {', '.join(map(str, res['f__kernels']))}; "
                     f"dequantize_weight dtype {', '.join(map(str, res['f__deq_dtype']))}")
    return res


def _check_gptqmodel(rep: VerifyReport, qt: QTensor, res: dict[str, np.ndarray], prefix: str,
                     dtype: torch.dtype, ir32: torch.Tensor) -> None:
    if not res:
        return                                  # the load failure is already reported
    got = res.get(f"f::{prefix}")
    deq = [str(d) for d in res["f__deq_dtype"]]
    gdt = getattr(torch, deq[0]) if len(deq) == 1 else dtype
    ir = ir32.to(gdt).float().numpy()
    ok, detail = _eq(got, ir)
    rep.add(qt.name, f"gptqmodel.{str(gdt).replace('torch.', '')}", ok,
            detail if got is not None else "not a GPTQModel quantized module")


def _check_adapter(rep: VerifyReport, folder: Path, model: QModel) -> None:
    res = {n: qt.residual for n, qt in model.tensors.items()
           if qt.residual is not None and not is_dense_only(n)}
    if not res:
        return
    ad = adapter_dir(folder)
    if not (ad / "adapter_model.safetensors").is_file():
        rep.add(str(ad), "adapter", False, "adapter folder missing")
        return
    from safetensors.torch import load_file
    t = load_file(str(ad / "adapter_model.safetensors"))
    cfg = json.loads((ad / "adapter_config.json").read_text())
    for name, r in sorted(res.items()):
        key = PEFT_PREFIX + module_of(name)
        for side, want in (("lora_A", r.B), ("lora_B", r.A)):
            got = t.get(f"{key}.{side}.weight")
            ok, detail = _eq(None if got is None else got.float().numpy(), want)
            rep.add(name, f"adapter.{side}", ok, detail)
        rank = cfg.get("rank_pattern", {}).get(module_of(name), cfg["r"])
        alpha = cfg.get("alpha_pattern", {}).get(module_of(name), cfg["lora_alpha"])
        rep.add(name, "adapter.scaling", rank == r.rank and alpha == rank,
                f"r {rank}, alpha {alpha}, IR rank {r.rank}")


def verify_vllm(folder: str | Path, model: QModel, *, library: bool = True,
                gptqmodel: bool = False) -> VerifyReport:
    """Compare the folder written by :func:`lower_vllm` with ``model`` (see module doc).

    ``gptqmodel``: GPTQ folders are also decoded by GPTQModel in its venv when there is one."""
    from safetensors.torch import load_file
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg.get("quantization_config") or {}
    fmt = {"gptq": "gptq", "compressed-tensors": "ct"}.get(qc.get("quant_method", ""))
    dname = cfg.get("torch_dtype") or cfg.get("dtype")
    if fmt is None or dname not in TORCH_DTYPES:
        raise VerifyError(f"{folder}/config.json: expected quant_method gptq or "
                          f"compressed-tensors and dtype float16/bfloat16 (found "
                          f"{qc.get('quant_method')!r}, {dname!r})")
    dtype = TORCH_DTYPES[dname]
    rep = VerifyReport(str(folder), fmt, dname)
    t = load_file(str(folder / "model.safetensors"))
    used: set[str] = set()
    lib = ct_library() if (library and fmt == "ct") else None
    if fmt == "ct" and lib is None:
        rep.notes.append("compressed-tensors not importable: library check skipped")
    gq = _gptqmodel_decode(rep, folder) if (library and gptqmodel and fmt == "gptq") else None
    if fmt == "gptq" and gq is None:
        rep.notes.append("GPTQ: no independent decoder run" + (
            "" if gptqmodel else " (gptqmodel=False)") + "; fields checked with qexport's "
            "decoder (layout pinned by golden words in the tests)")
    skipped: set[str] = set()
    for name, qt in sorted(model.tensors.items()):
        if is_dense_only(name):
            continue
        prefix = module_of(name)
        declared, group = _declared(fmt, qc, prefix)
        key = format_of(qt.spec)
        rep.add(name, "config", declared == key, f"declared {declared}, IR {key}")
        if declared != key:
            continue
        bits, gs, sym = key
        try:
            if fmt == "ct":
                d, layout = decode_ct(t, prefix, bits, gs, sym, _preferred_layout(qc))
            else:
                d = decode_gptq(t, prefix, bits, gs, sym, *qt.shape)
        except VerifyError as e:
            rep.add(name, "decode", False, str(e))
            continue
        used.update(k for k in t if k.rsplit(".", 1)[0] == prefix)
        _check_fields(rep, qt, d)
        ir = torch.from_numpy(qt.dequantize(with_residual=False)) \
            if gq is not None or lib is not None else None     # decoded once for both checks
        if gq is not None:
            _check_gptqmodel(rep, qt, gq, prefix, dtype, ir)
        if lib is not None:
            why = _library_usable(lib, bits, layout)
            if why is None:
                _check_library(rep, qt, t, prefix, group, dtype, ir)
            else:
                skipped.add(why)
    rep.notes.extend(sorted(skipped))
    _check_dense(rep, t, model, dtype, used)
    _check_adapter(rep, folder, model)
    return rep


def _check_dense(rep: VerifyReport, t: dict[str, torch.Tensor], model: QModel,
                 dtype: torch.dtype, used: set[str]) -> None:
    want = dict(model.passthrough)
    want.update({n: qt.dequantize(True) for n, qt in model.tensors.items() if is_dense_only(n)})
    if model.config.get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    for name, value in sorted(want.items()):
        got = t.get(name)
        if got is None:
            rep.add(name, "dense", False, "missing from the checkpoint")
            continue
        used.add(name)
        exp = torch.from_numpy(np.ascontiguousarray(value)).to(dtype)
        ok, detail = _eq(got.float().numpy(), exp.float().numpy())
        rep.add(name, "dense", ok and got.dtype == dtype,
                detail or ("" if got.dtype == dtype else f"dtype {got.dtype}"))
    extra = sorted(set(t) - used)
    if extra:
        rep.add(extra[0], "extra", False, f"{len(extra)} tensors not in the IR: {extra[:3]}")
