"""onnxruntime-genai (in .venv-ort, tools/setup_ort.sh) loads exported folders and generates; CUDA
EP tests run only where a GPU is usable."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from onnx_irutil import rtn_qmodel

from qexport.backends.onnx import (OnnxDecoder, cuda_available, lower_onnx, mnb_spec,
                                   verify_onnx)
from qexport.backends.onnx.probe import decode_with_ort
from qexport.backends.onnx.pack import pack_qtensor

REPO = Path(__file__).resolve().parents[3]
ORT_PY = REPO / ".venv-ort" / "bin" / "python"

GENAI_SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime_genai as og
folder, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
cfg = og.Config(folder)
cfg.clear_providers()
model = og.Model(cfg)
tok = og.Tokenizer(model)
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(prompt) + n, do_sample=False, batch_size=1)
gen = og.Generator(model, params)
gen.append_tokens(np.array([prompt], dtype=np.int32))
while not gen.is_done():
    gen.generate_next_token()
out = [int(t) for t in gen.get_sequence(0)][len(prompt):]
enc = [int(t) for t in tok.encode("def main(): return 42")]
print(json.dumps({"tokens": out, "encoded": enc, "version": og.__version__}))
"""


def _genai(folder: Path, prompt: list[int], n: int) -> dict:
    if not ORT_PY.is_file():
        pytest.skip(f"{ORT_PY} absent: run tools/setup_ort.sh")
    r = subprocess.run([str(ORT_PY), "-c", GENAI_SCRIPT, str(folder), json.dumps(prompt), str(n)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.runtime
@pytest.mark.parametrize("fixture,sym", [("tiny_llama", True), ("tiny_qwen2", False)])
def test_genai_generates_same_tokens_as_plain_onnxruntime(request, fixture, sym, tmp_path):
    hf = request.getfixturevalue(fixture)
    model = rtn_qmodel(hf, mnb_spec(4, 32, sym))
    folder = lower_onnx(model, tmp_path / "g")
    prompt = [1, 317, 617, 260, 830, 316]
    res = _genai(folder, prompt, 12)
    assert res["version"] == "0.18.0"
    assert res["tokens"] == OnnxDecoder(folder / "model.onnx", "cpu").greedy(prompt, 12)
    import sentencepiece as spm                 # the tokenizer the fixture was trained as
    sp = spm.SentencePieceProcessor(model_file=str(hf / "tokenizer.model"))
    assert res["encoded"] == sp.encode("def main(): return 42")


needs_cuda = pytest.mark.skipif(not cuda_available(), reason="CUDAExecutionProvider not usable")


@pytest.mark.gpu
@needs_cuda
def test_cuda_one_node_decodes_bitexact(rng):
    from onnx_irutil import rtn_qtensor
    W = rng.normal(0, 0.05, (64, 200)).astype(np.float32)
    for sym in (True, False):
        qt = rtn_qtensor("w", W, mnb_spec(4, 32, sym))
        got, prov = decode_with_ort(pack_qtensor(qt, "fp32"), 0, "cuda")
        assert prov == "CUDAExecutionProvider"
        assert np.array_equal(got, qt.dequantize())


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_cuda_decoder_matches_reference(tiny_llama, tmp_path, dtype):
    model = rtn_qmodel(tiny_llama, mnb_spec(4, 32, False))
    folder = lower_onnx(model, tmp_path / dtype, dtype=dtype)
    rep = verify_onnx(folder, model, device="cuda")
    assert rep.provider == "CUDAExecutionProvider"
    assert rep.ok, rep.summary()
