"""llama.cpp's quantizers re-implemented in numpy (``llamacpp_quantize``).

Oracles: gguf-py's own ports of the legacy quantizers (Q4_0..Q8_0) in the main venv, and the
real llama.cpp (``ggml_quantize_chunk`` and ``llama_model_quantize`` from llama-cpp-python in
``.venv-llama``, runtime-marked) for every type, with and without an imatrix.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from qexport.backends.gguf import (GGUF_TYPES, gguf_type, llamacpp_quantize, pack_tensor,
                                   spec_for)
from qexport.backends.gguf.llamacpp_search import best_index_int8, nearest_int
from qexport.backends.gguf.types import KVALUES_IQ4NL
from qexport.errors import InputError, LoweringError, NumericsError
from qexport.grids import dequantize, fit_minmax, quantize_nearest, validate

TYPES = list(GGUF_TYPES)
LEGACY = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
REPO = Path(__file__).resolve().parents[3]
LLAMA_PY = REPO / ".venv-llama" / "bin" / "python"


def _weights(rng: np.random.Generator, out_f: int = 24, in_f: int = 512) -> np.ndarray:
    """Gaussian rows of different scales plus rows llama.cpp treats specially."""
    W = rng.standard_normal((out_f, in_f)) * rng.uniform(1e-3, 2.0, (out_f, 1))
    W[0, :256] = 0.0                                   # all-zero super-block
    W[1, :64] = 0.5                                    # constant blocks
    W[2] = np.round(W[2] * 4) / 4                      # many exact ties, signed zeros
    W[3, :256] = rng.standard_t(2, 256)                # heavy tails
    W[4] = np.abs(W[4])                                # all positive (min clamped to 0)
    W[5] = -np.abs(W[5]) * 1e-6                        # tiny, all negative
    W[6, 32:64] = -0.0
    return W.astype(np.float32)


def _imatrix(rng: np.random.Generator, in_f: int = 512) -> np.ndarray:
    im = (rng.uniform(0, 1, in_f) ** 4 * 10).astype(np.float32)
    im[:5] = 0.0
    return im


# ---------------------------------------------------------------- helpers
def test_nearest_int_and_best_index_follow_llama_cpp():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -7.51], np.float32)
    assert nearest_int(v).tolist() == [0, 2, 2, 0, -2, -2, 3, -8]      # ties to even
    kv = np.asarray(KVALUES_IQ4NL, np.float32)
    x = np.array([-200, -127, -4.5, -4.49, -4.51, 0.0, 101, 113, 500], np.float32)
    # midpoint of -10 and 1 is -4.5: llama.cpp picks the upper entry on an exact tie
    assert best_index_int8(kv, x).tolist() == [0, 0, 8, 8, 7, 8, 15, 15, 15]


# ---------------------------------------------------------------- legacy vs gguf-py
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_gguf_py_quantize(name):
    rng = np.random.default_rng(LEGACY.index(name))
    W = (rng.standard_normal((16, 512)) * rng.uniform(1e-3, 3, (16, 1))).astype(np.float32)
    W[0, :32] = 0.0
    W[1, :32] = 0.75
    row = gguf_type(name)
    codes, grid = llamacpp_quantize(W, name)
    raw = pack_tensor(codes, grid, row.spec)
    assert np.array_equal(raw, gguf.quants.quantize(W, row.ggml_type))


def test_signed_zero_block_follows_llama_cpp_not_gguf_py():
    """A block of +-0.0: llama.cpp's max stays +0, so d = 0/-8 = -0.0 (fp16 0x8000); gguf-py's
    port takes the first element's sign. We follow llama.cpp (checked by the runtime test)."""
    W = np.zeros((1, 32), np.float32)
    W[0, ::2] = -0.0
    codes, grid = llamacpp_quantize(W, "Q4_0")
    raw = pack_tensor(codes, grid, spec_for("Q4_0"))
    assert raw[0, :2].tolist() == [0x00, 0x80] and np.all(codes == 8)


# ---------------------------------------------------------------- IR validity and quality
@pytest.mark.parametrize("name", TYPES)
def test_output_is_valid_ir_matching_gguf_decode(name):
    rng = np.random.default_rng(10 + TYPES.index(name))
    W = _weights(rng, 12, 512)
    row = gguf_type(name)
    for im in (None, _imatrix(rng)):
        codes, grid = llamacpp_quantize(W, name, im, name="blk.0.ffn_up.weight")
        validate(codes, grid, row.spec)
        raw = pack_tensor(codes, grid, row.spec)
        deq = dequantize(codes, grid, row.spec)
        assert np.array_equal(gguf.quants.dequantize(raw, row.ggml_type).view(np.uint32),
                              deq.view(np.uint32))
        assert np.all(deq[0, :256] == 0)                 # all-zero block decodes to zero


@pytest.mark.parametrize("name", TYPES)
def test_quantizer_error_vs_minmax_baseline_and_imatrix(name):
    """llama.cpp's searches beat plain min-max RTN (Q4_1/Q5_1 *are* min-max); the imatrix
    lowers the importance-weighted error it is meant to lower."""
    rng = np.random.default_rng(20 + TYPES.index(name))
    W = (rng.standard_normal((32, 512)) * rng.uniform(0.01, 1, (32, 1))).astype(np.float32)
    im = _imatrix(rng)
    spec = spec_for(name)
    g0 = fit_minmax(spec, W)
    base = np.mean((dequantize(quantize_nearest(spec, g0, W), g0, spec) - W) ** 2)
    c, g = llamacpp_quantize(W, name)
    err = (dequantize(c, g, spec) - W) ** 2
    if name in ("Q4_1", "Q5_1"):
        assert err.mean() <= base * 1.001
    else:
        assert err.mean() < base * 0.97
    c, g = llamacpp_quantize(W, name, im)
    werr = np.mean(im * (dequantize(c, g, spec) - W) ** 2)
    if name == "Q8_0":                                   # llama.cpp ignores it for Q8_0
        assert np.isclose(werr, np.mean(im * err))
    else:
        assert werr < 0.85 * np.mean(im * err)


def test_input_errors_name_the_tensor():
    W = np.zeros((2, 576), np.float32)
    with pytest.raises(LoweringError, match=r"blk\.3\.attn_q\.weight.*Q4_K.*256.*576"):
        llamacpp_quantize(W, "Q4_K", name="blk.3.attn_q.weight")
    W = np.zeros((2, 512), np.float32)
    W[1, 3] = np.nan
    with pytest.raises(NumericsError, match="w: expected finite weights"):
        llamacpp_quantize(W, "Q6_K", name="w")
    with pytest.raises(InputError, match=r"imatrix expected shape \[512\]"):
        llamacpp_quantize(np.zeros((2, 512), np.float32), "Q4_K", np.ones(256, np.float32))
    with pytest.raises(InputError, match="2-D"):
        llamacpp_quantize(np.zeros(512, np.float32), "Q4_K")


# ---------------------------------------------------------------- the real llama.cpp
ORACLE = r"""
import ctypes, json, os, sys
import numpy as np
import llama_cpp
lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_void_p]
lib.ggml_row_size.restype = ctypes.c_size_t
lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
job = json.load(open(sys.argv[1]))
data = np.load(job["npz"])
W = np.ascontiguousarray(data["W"], dtype=np.float32)
im = np.ascontiguousarray(data["im"], dtype=np.float32)
out = {}
for t in job["types"]:
    for use_im in (0, 1):
        dst = np.zeros((W.shape[0], lib.ggml_row_size(t, W.shape[1])), np.uint8)
        lib.ggml_quantize_chunk(t, W.ctypes.data, dst.ctypes.data, 0, W.shape[0], W.shape[1],
                                im.ctypes.data if use_im else None)
        out["%d_%d" % (t, use_im)] = dst
for ft, path in job.get("model_quantize", []):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ft)
    p.nthread = 2
    p.pure = True
    rc = llama_cpp.llama_model_quantize(job["f32"].encode(), path.encode(), p)
    assert rc == 0, (ft, rc)
np.savez(job["out"], **out)
"""


def _run_llama(tmp_path: Path, job: dict) -> dict:
    if not LLAMA_PY.exists():
        pytest.skip(f"{LLAMA_PY} absent (run tools/setup_llama.sh)")
    script = tmp_path / "oracle.py"
    script.write_text(ORACLE)
    job["out"] = str(tmp_path / "out.npz")
    (tmp_path / "job.json").write_text(json.dumps(job))
    subprocess.run([str(LLAMA_PY), str(script), str(tmp_path / "job.json")], check=True,
                   capture_output=True, timeout=300)
    return dict(np.load(job["out"]))


def _differing_blocks(ours: np.ndarray, ref: np.ndarray, type_size: int) -> int:
    return int(np.any(ours.reshape(-1, type_size) != ref.reshape(-1, type_size), axis=1).sum())


@pytest.mark.runtime
def test_bytes_equal_ggml_quantize_chunk(tmp_path):
    """Every type, with and without imatrix, equals llama.cpp's quantize_<type> byte for byte."""
    rng = np.random.default_rng(7)
    W, im = _weights(rng, 32, 1024), _imatrix(rng, 1024)
    np.savez(tmp_path / "in.npz", W=W, im=im)
    ref = _run_llama(tmp_path, {"npz": str(tmp_path / "in.npz"),
                                "types": [int(GGUF_TYPES[t].ggml_type) for t in TYPES]})
    report = {}
    for name in TYPES:
        row = gguf_type(name)
        for use_im in (0, 1):
            c, g = llamacpp_quantize(W, name, im if use_im else None)
            ours = pack_tensor(c, g, row.spec)
            report[f"{name}{'+im' if use_im else ''}"] = _differing_blocks(
                ours, ref[f"{int(row.ggml_type)}_{use_im}"], row.type_size)
    assert all(v == 0 for v in report.values()), f"differing blocks: {report}"


MODEL_QUANTIZE = {"Q4_0": "Q4_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0", "Q2_K": "Q2_K",
                  "Q3_K": "Q3_K_S", "Q4_K": "Q4_K_S", "Q5_K": "Q5_K_S", "Q6_K": "Q6_K",
                  "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS"}


def _write_f32_gguf(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A 1-layer F32 llama GGUF (enough for llama_model_quantize: arch + hparams)."""
    H, FF, V = 256, 512, 64
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(1)
    w.add_feed_forward_length(FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(H // 4)
    w.add_vocab_size(V)
    w.add_file_type(0)
    mats = {"token_embd.weight": (V, H), "output.weight": (V, H),
            "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H // 2, H),
            "blk.0.attn_v.weight": (H // 2, H), "blk.0.attn_output.weight": (H, H),
            "blk.0.ffn_gate.weight": (FF, H), "blk.0.ffn_up.weight": (FF, H),
            "blk.0.ffn_down.weight": (H, FF)}
    weights = {}
    for k, shape in mats.items():
        weights[k] = (rng.standard_normal(shape) * rng.uniform(0.01, 0.1, (shape[0], 1))
                      ).astype(np.float32)
        w.add_tensor(k, weights[k])
    for k in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        w.add_tensor(k, np.ones(H, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


@pytest.mark.runtime
def test_bytes_equal_llama_model_quantize(tmp_path):
    """The tool path: llama_model_quantize (pure) of an F32 GGUF, compared tensor by tensor."""
    rng = np.random.default_rng(8)
    f32 = tmp_path / "f32.gguf"
    weights = _write_f32_gguf(f32, rng)
    np.savez(tmp_path / "in.npz", W=np.zeros((1, 32), np.float32), im=np.zeros(32, np.float32))
    jobs = [(ft, str(tmp_path / f"{t}.gguf")) for t, ft in MODEL_QUANTIZE.items()]
    _run_llama(tmp_path, {"npz": str(tmp_path / "in.npz"), "types": [], "f32": str(f32),
                          "model_quantize": jobs})
    report = {}
    for name in MODEL_QUANTIZE:
        row = gguf_type(name)
        for t in gguf.GGUFReader(tmp_path / f"{name}.gguf").tensors:
            if t.name not in weights:
                continue
            assert t.tensor_type == row.ggml_type, (name, t.name, t.tensor_type)
            c, g = llamacpp_quantize(weights[t.name], name, name=t.name)
            ours = pack_tensor(c, g, row.spec, name=t.name)
            report[f"{name}:{t.name}"] = _differing_blocks(ours, np.asarray(t.data),
                                                           row.type_size)
    assert len(report) == len(MODEL_QUANTIZE) * len(weights)
    assert all(v == 0 for v in report.values()), {k: v for k, v in report.items() if v}
