"""qexport GGUF files in the real runtime: llama.cpp (llama-cpp-python in ``.venv-llama``, made by
``tools/setup_llama.sh``). One llama.cpp subprocess per group of models.

Reference: transformers' fp32 model built from ``QModel.state_dict()`` (the IR's dequantized
weights). Tolerances on full-vocabulary log-probabilities, measured on these tiny random models:

- F32 file: llama.cpp vs transformers max |dlogprob| ~0.002 -> bound 0.01.
- quantized weights: llama.cpp also quantizes the *activations* to 8 bits for quantized matmuls
  (q8_0 / q8_K dot products), which gives max ~0.05-0.11 and mean ~0.01-0.02 here -> bounds
  max 0.25, mean 0.03. A wrong Q/K permutation moves log-probs by ~2.4 and a wrong block layout
  by far more, so the bounds still catch lowering bugs.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest

from qexport.backends.gguf.lora import lower_gguf_lora
from qexport.backends.gguf.names import gguf_to_hf
from qexport.backends.gguf.recipes import RECIPES, plan_recipe
from qexport.backends.gguf.types import spec_for
from qexport.backends.gguf.writer import lower_gguf
from qexport.grids import fit_minmax, quantize_nearest
from qexport.ir import LowRank, QModel, QTensor

pytestmark = [pytest.mark.runtime, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]
LLAMA_PY = REPO / ".venv-llama" / "bin" / "python"
TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
         "IQ4_NL", "IQ4_XS"]
TEXT = "def main(args):\n    return sorted(args, key=len) + [42]\n"
MAX_Q, MEAN_Q, MAX_F32 = 0.25, 0.03, 0.01

RUNNER = r"""
import ctypes, json, sys
import numpy as np
import llama_cpp
job = json.load(open(sys.argv[1]))
out = {}
for i, j in enumerate(job.get("eval", [])):
    llm = llama_cpp.Llama(model_path=j["model"], n_ctx=256, n_threads=2, n_batch=256,
                          logits_all=True, verbose=False, lora_path=j.get("lora"))
    llm.eval(j["ids"])
    lg = np.array(llm.scores[: len(j["ids"])], dtype=np.float64)
    lg -= lg.max(-1, keepdims=True)
    out["lp%d" % i] = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    out["tok%d" % i] = np.array(llm.tokenize(job["text"].encode()), dtype=np.int64)
    del llm
for i, q in enumerate(job.get("quantize", [])):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + q["ftype"])
    p.nthread = 2
    p.pure = bool(q.get("pure"))
    out["rc_q%d" % i] = np.array(llama_cpp.llama_model_quantize(
        q["src"].encode(), q["dst"].encode(), ctypes.byref(p)))
np.savez(job["out"], **out)
"""


def _need_llama() -> None:
    if not LLAMA_PY.exists():
        pytest.skip(f"{LLAMA_PY} absent: run tools/setup_llama.sh")


def run_llama(job: dict, tmp: Path) -> dict[str, np.ndarray]:
    (tmp / "runner.py").write_text(RUNNER)
    job = {**job, "out": str(tmp / "out.npz")}
    (tmp / "job.json").write_text(json.dumps(job))
    res = subprocess.run([str(LLAMA_PY), str(tmp / "runner.py"), str(tmp / "job.json")],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise AssertionError(f"llama.cpp runner failed ({res.returncode}): {res.stderr[-2000:]}")
    return dict(np.load(tmp / "out.npz"))


def build_ir(folder: Path, type_name: str | None) -> QModel:
    """RTN IR of an HF folder: every layer linear on ``type_name`` (None: all float)."""
    from safetensors.numpy import load_file
    m = QModel(config=json.loads((folder / "config.json").read_text()))
    for k, v in load_file(folder / "model.safetensors").items():
        v = v.astype(np.float32)
        if type_name and v.ndim == 2 and "layers" in k:
            spec = spec_for(type_name)
            g = fit_minmax(spec, v)
            m.tensors[k] = QTensor(k, quantize_nearest(spec, g, v, 0), g, spec)
        else:
            m.passthrough[k] = v
    m.tokenizer = {f.name: f.read_bytes() for f in folder.iterdir()
                   if f.name.startswith("tokenizer")}
    return m


def torch_logprobs(sd: dict[str, np.ndarray], config: dict, ids: list[int]) -> np.ndarray:
    """transformers fp32 log-softmax ``[len(ids), vocab]`` of a state dict."""
    import torch
    import transformers
    cfg = {k: v for k, v in config.items() if k != "model_type"}
    net = getattr(transformers, config["architectures"][0])(
        transformers.AutoConfig.for_model(config["model_type"], **cfg)).eval()
    missing, unexpected = net.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()},
                                              strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        logits = net(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def _hf_ids(folder: Path) -> list[int]:
    """Token ids from transformers' tokenizer of the folder (the oracle for llama.cpp's)."""
    from transformers import AutoTokenizer
    return list(AutoTokenizer.from_pretrained(str(folder))(TEXT)["input_ids"])


def _bpe_tokenizer():
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on this Python's stdlib sources."""
    import glob
    import sysconfig
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    files = sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py"))[:20]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator((open(f, encoding="utf-8", errors="ignore").read() for f in files),
                            trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|eot|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    return tok


def _bpe_ir(folder: Path, tmp: Path) -> QModel:
    """tiny_llama (vocab cut to the BPE's size) with a byte-level BPE tokenizer.json."""
    tok = _bpe_tokenizer()
    n = tok.get_vocab_size()
    m = build_ir(folder, "Q8_0")
    m.tokenizer = {"tokenizer.json": tok.to_str().encode()}
    m.config = {**m.config, "vocab_size": n, "bos_token_id": 0, "eos_token_id": 0}
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        m.passthrough[k] = m.passthrough[k][:n].copy()
    (tmp / "bpe_ids.json").write_text(json.dumps(tok.encode(TEXT).ids))
    return m


@pytest.fixture(scope="module")
def runtime_results(tiny_llama: Path, tiny_qwen2: Path, tiny_mistral: Path,
                    tmp_path_factory: pytest.TempPathFactory) -> dict:
    _need_llama()
    from safetensors.numpy import load_file
    tmp = tmp_path_factory.mktemp("llamacpp")
    ids = _hf_ids(tiny_llama)
    cases: dict[str, tuple[QModel, str | None]] = {}
    for t in TYPES:
        cases[f"llama-{t}"] = (build_ir(tiny_llama, t), None)
    cases["llama-F32"] = (build_ir(tiny_llama, None), None)
    cases["qwen2-Q4_K"] = (build_ir(tiny_qwen2, "Q4_K"), None)
    cases["qwen2-Q8_0"] = (build_ir(tiny_qwen2, "Q8_0"), None)
    cases["mistral-Q6_K"] = (build_ir(tiny_mistral, "Q6_K"), None)
    # LoRC: rank-64 fp16 SVD of the Q2_K error on every linear, as a LoRA adapter
    lorc = build_ir(tiny_llama, "Q2_K")
    dense = {k: v.astype(np.float32) for k, v in load_file(tiny_llama / "model.safetensors").items()}
    for name, qt in lorc.tensors.items():
        u, s, vt = np.linalg.svd(dense[name] - qt.dequantize(), full_matrices=False)
        A = (u[:, :64] * s[:64]).astype(np.float16).astype(np.float32)
        qt.residual = LowRank(A, vt[:64].astype(np.float16).astype(np.float32), "fp16")
    adapter = lower_gguf_lora(lorc, tmp / "lorc.gguf")
    cases["llama-Q2_K+lora"] = (lorc, str(adapter))
    cases["bpe-Q8_0"] = (_bpe_ir(tiny_llama, tmp), None)
    job = {"text": TEXT, "eval": []}
    for key, (m, lora) in cases.items():
        p = lower_gguf(m, tmp / f"{key.split('+')[0]}.gguf", force=True)
        eids = json.loads((tmp / "bpe_ids.json").read_text()) if key.startswith("bpe") else ids
        job["eval"].append({"model": str(p), "ids": eids, "lora": lora})
    out = run_llama(job, tmp)
    res = {}
    for i, (key, (m, lora)) in enumerate(cases.items()):
        ref = torch_logprobs(m.state_dict(with_residual=lora is not None), m.config,
                             job["eval"][i]["ids"])
        res[key] = {"lp": out[f"lp{i}"], "ref": ref, "tok": out[f"tok{i}"]}
    res["dense"] = torch_logprobs(dense, lorc.config, ids)
    res["bpe_ids"] = json.loads((tmp / "bpe_ids.json").read_text())
    res["ids"] = ids
    return res


@pytest.mark.parametrize("key", [f"llama-{t}" for t in TYPES] + [
    "llama-F32", "qwen2-Q4_K", "qwen2-Q8_0", "mistral-Q6_K", "llama-Q2_K+lora", "bpe-Q8_0"])
def test_logprobs_match_ir(runtime_results: dict, key: str) -> None:
    r = runtime_results[key]
    d = np.abs(r["lp"] - r["ref"])
    if key.endswith("F32"):
        assert d.max() < MAX_F32, d.max()
    else:
        assert d.max() < MAX_Q and d.mean() < MEAN_Q, (d.max(), d.mean())


def test_tokenizer_matches_transformers(runtime_results: dict) -> None:
    for key in ("llama-Q4_K", "qwen2-Q4_K", "mistral-Q6_K"):
        assert runtime_results[key]["tok"].tolist() == runtime_results["ids"], key
    # byte-level BPE tokenizer.json -> tokenizer.ggml.model gpt2: llama.cpp == tokenizers
    assert runtime_results["bpe-Q8_0"]["tok"].tolist() == runtime_results["bpe_ids"]


def test_lora_adapter_moves_toward_dense(runtime_results: dict) -> None:
    """The adapter brings llama.cpp's log-probs toward the unquantized model by about as much
    as the residual does in the torch reference."""
    dense = runtime_results["dense"]
    base, lora = runtime_results["llama-Q2_K"], runtime_results["llama-Q2_K+lora"]
    gain = np.abs(base["lp"] - dense).mean() - np.abs(lora["lp"] - dense).mean()
    ref_gain = np.abs(base["ref"] - dense).mean() - np.abs(lora["ref"] - dense).mean()
    assert ref_gain > 0.05 and gain > 0.8 * ref_gain, (gain, ref_gain)


def _recipe_model(tokenizer_dir: Path, hidden: int, heads: int, kv: int, inter: int,
                  tied: bool, rng: np.random.Generator) -> QModel:
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": 16, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": 1000, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": tied}
    hd = hidden // heads

    def w(*shape: int) -> np.ndarray:
        return rng.normal(0, 0.05, shape).astype(np.float16).astype(np.float32)
    pt = {"model.embed_tokens.weight": w(1000, hidden), "model.norm.weight": np.ones(hidden,
                                                                                    np.float32)}
    if not tied:
        pt["lm_head.weight"] = w(1000, hidden)
    for i in range(16):
        p = f"model.layers.{i}."
        pt.update({p + "self_attn.q_proj.weight": w(hidden, hidden),
                   p + "self_attn.k_proj.weight": w(kv * hd, hidden),
                   p + "self_attn.v_proj.weight": w(kv * hd, hidden),
                   p + "self_attn.o_proj.weight": w(hidden, hidden),
                   p + "mlp.gate_proj.weight": w(inter, hidden),
                   p + "mlp.up_proj.weight": w(inter, hidden),
                   p + "mlp.down_proj.weight": w(hidden, inter),
                   p + "input_layernorm.weight": np.ones(hidden, np.float32),
                   p + "post_attention_layernorm.weight": np.ones(hidden, np.float32)})
    tok = {f.name: f.read_bytes() for f in tokenizer_dir.iterdir()
           if f.name.startswith("tokenizer")}
    return QModel(config=cfg, passthrough=pt, tokenizer=tok)


def test_recipes_match_llama_quantize(tokenizer_dir: Path, tmp_path: Path) -> None:
    """plan_recipe == the per-tensor types llama.cpp's llama_model_quantize writes, for every
    recipe (+ one --pure) on two 16-layer models: rows of 128 (fallbacks, n_gqa 4, tied) and
    rows of 256 (no fallback on the body, n_gqa 2, untied)."""
    _need_llama()
    rng = np.random.default_rng(0)
    models = {"a": _recipe_model(tokenizer_dir, 128, 4, 1, 256, True, rng),
              "b": _recipe_model(tokenizer_dir, 256, 4, 2, 512, False, rng)}
    job: dict = {"quantize": []}
    expect = []
    for key, m in models.items():
        src = lower_gguf(m, tmp_path / f"{key}-f.gguf")
        shapes = {k: v.shape for k, v in m.passthrough.items()}
        for recipe in sorted(RECIPES) + ["Q4_K_M/pure"]:
            name, pure = recipe.split("/")[0], recipe.endswith("/pure")
            dst = tmp_path / f"{key}-{recipe.replace('/', '-')}.gguf"
            job["quantize"].append({"src": str(src), "dst": str(dst), "ftype": name,
                                    "pure": pure})
            expect.append((dst, plan_recipe(name, m.config, shapes, pure=pure)))
    out = run_llama(job, tmp_path)
    for i, (dst, plan) in enumerate(expect):
        assert int(out[f"rc_q{i}"]) == 0, dst
        got = {gguf_to_hf(t.name): t.tensor_type.name
               for t in gguf.GGUFReader(str(dst)).tensors}
        want = {k: p.type_name for k, p in plan.items()}
        diff = {k: (want[k], got.get(k)) for k in want if want[k] != got.get(k)}
        assert not diff, (dst.name, sorted(diff.items())[:6])
