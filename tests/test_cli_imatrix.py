"""``--method rtn --imatrix FILE|auto`` and ``qexport imatrix``.

Oracles: imatrix files written here with gguf-py's own writer in llama-imatrix's layout
(``blk.N.*.in_sum2`` / ``.counts``, llama.cpp names typed out), quantized directly with
:func:`llamacpp_quantize` (itself checked byte for byte against llama.cpp in
tests/backends/gguf); the ``qexport imatrix`` values against transformers forward hooks (mean
squared input activation per column); bad files -> exit 2, one line, nothing written.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport.backends.gguf.llamacpp_quants import llamacpp_quantize
from qexport.irio import load_ir
from qexport.model import load_model

#: llama.cpp's names of the decoder linears (typed out: independent of qexport's name table)
GGUF_LIN = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
COUNT = 1536


def write_imatrix(path: Path, sums: dict[str, np.ndarray], counts: dict[str, float],
                  general_type: str = "imatrix") -> Path:
    """A llama-imatrix-layout GGUF file written with gguf-py: ``{gguf name: in_sum2}``."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch="")
    w.add_type(general_type)
    w.add_array("imatrix.datasets", ["test"])
    w.add_uint32("imatrix.chunk_count", 3)
    w.add_uint32("imatrix.chunk_size", 512)
    for g, s in sums.items():
        w.add_tensor(f"{g}.in_sum2", np.asarray(s, np.float32).reshape(1, -1))
        w.add_tensor(f"{g}.counts", np.full((1, 1), counts[g], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_sums(model: Path, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Log-normal in_sum2 for every decoder linear of ``model`` (llama.cpp names)."""
    src = load_model(model)
    rng = np.random.default_rng(seed)
    sums, counts = {}, {}
    for i in range(src.arch.n_layers):
        for g, hf in GGUF_LIN.items():
            n_in = src.shape(f"model.layers.{i}.{hf}.weight")[1]
            sums[f"blk.{i}.{g}.weight"] = (np.exp(rng.normal(0, 1.5, n_in)) * COUNT).astype(
                np.float32)
            counts[f"blk.{i}.{g}.weight"] = COUNT
    return sums, counts


def hf_name(gname: str) -> str:
    _, i, g, _ = gname.split(".")
    return f"model.layers.{i}.{GGUF_LIN[g]}.weight"


@pytest.fixture(scope="module")
def imat(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    sums, counts = random_sums(tiny_llama)
    p = write_imatrix(tmp_path_factory.mktemp("imat") / "tiny.imatrix.gguf", sums, counts)
    values = {hf_name(g): s / np.float32(counts[g]) for g, s in sums.items()}
    return {"path": p, "sums": sums, "counts": counts, "values": values}


def _same(a, b) -> bool:
    return np.array_equal(a.codes, b.codes) and all(
        np.array_equal(v, b.grid.arrays()[k]) for k, v in a.grid.arrays().items())


@pytest.mark.parametrize("typ", ["Q4_0", "Q4_K", "IQ4_XS"])
def test_imatrix_file_gives_llamacpp_quantize_codes(typ, tiny_llama, imat, tmp_path):
    res = run_cli("quantize", tiny_llama, "--to", "gguf", "--type",
                  {"Q4_K": "Q4_K_S"}.get(typ, typ), "--pure", "--method", "rtn",
                  "--imatrix", imat["path"], "--quiet", "-o", tmp_path / "im.qir")
    assert res.exit_code == 0, (res.stderr, res.exception)
    res = run_cli("quantize", tiny_llama, "--to", "gguf", "--type",
                  {"Q4_K": "Q4_K_S"}.get(typ, typ), "--pure", "--method", "rtn", "--quiet",
                  "-o", tmp_path / "plain.qir")
    assert res.exit_code == 0, res.stderr
    qm, plain = load_ir(tmp_path / "im.qir"), load_ir(tmp_path / "plain.qir")
    src = load_model(tiny_llama)
    n_diff = 0
    for name, qt in qm.tensors.items():
        assert qt.spec.name == f"gguf-{typ.lower()}"
        im = imat["values"].get(name)              # embeddings / lm_head: no entry
        codes, grid = llamacpp_quantize(src.get(name), typ, im, name=name)
        assert np.array_equal(qt.codes, codes), name
        for k, v in grid.arrays().items():
            assert np.array_equal(qt.grid.arrays()[k], v), (name, k)
        assert qt.stats["method"] == ("llamacpp-rtn+imatrix" if im is not None
                                      else "llamacpp-rtn")
        n_diff += not _same(qt, plain.tensors[name])
    assert n_diff >= 10, n_diff                       # the imatrix changed the linears
    prov = qm.provenance["imatrix"]
    assert prov["sha256"] == hashlib.sha256(imat["path"].read_bytes()).hexdigest()
    assert prov["entries"] == 14 and qm.provenance["options"]["imatrix"] == str(imat["path"])
    assert qm.recipe["imatrix"] is True


def test_imatrix_ir_lowers_and_verifies(tiny_llama, imat, tmp_path):
    res = run_cli("convert", tiny_llama, "--to", "gguf", "--type", "Q4_K_M", "--method", "rtn",
                  "--imatrix", imat["path"], "--quiet", "--save-ir", tmp_path / "ir",
                  "-o", tmp_path / "m.gguf")
    assert res.exit_code == 0, (res.stderr, res.exception)
    res = run_cli("verify", tmp_path / "m.gguf", "--ir", tmp_path / "ir")
    assert res.exit_code == 0 and "OK: artifact matches the IR" in res.output, res.output


def _hook_imatrix(model: Path, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Oracle: mean x^2 per input column of every decoder linear, from transformers hooks."""
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    out, hooks = {}, []
    for name, mod in m.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            def hook(_m, inp, _o, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                out[name + ".weight"] = x.square().mean(0).numpy()
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        m(ids)
    return out


def test_tiled_calibration_in_imatrix_and_quantize(tiny_llama, calib_file, tmp_path):
    """--calib-sampling tiled reaches the windows of `qexport imatrix` (its in_sum2 are those of
    the consecutive chunks) and of a calibrated quantize run (recorded in the provenance)."""
    import gguf

    from qexport.calib import load_calibration
    f = tmp_path / "tiled.imatrix.gguf"
    res = run_cli("imatrix", tiny_llama, "--calib", calib_file, "--n-samples", "3", "--seq-len",
                  "32", "--calib-sampling", "tiled", "--quiet", "-o", f)
    assert res.exit_code == 0, (res.stderr, res.exception)
    ids, info = load_calibration(calib_file, load_model(tiny_llama).tokenizer, n_samples=3,
                                 seq_len=32, sampling="tiled")
    assert torch.equal(ids[:, 1:], load_calibration(calib_file, load_model(tiny_llama).tokenizer,
                                                    n_samples=1, seq_len=96,
                                                    sampling="tiled")[0].reshape(3, 32)[:, 1:])
    want = _hook_imatrix(tiny_llama, ids)
    data = {t.name: np.asarray(t.data, np.float32).reshape(-1)
            for t in gguf.GGUFReader(str(f)).tensors}
    for g in (n[:-len(".in_sum2")] for n in data if n.endswith(".in_sum2")):
        np.testing.assert_allclose(data[f"{g}.in_sum2"] / 96, want[hf_name(g)], rtol=2e-4,
                                   atol=1e-7, err_msg=g)
    res = run_cli("quantize", tiny_llama, "--method", "gptq", "--calib", calib_file, "--n-samples",
                  "3", "--seq-len", "32", "--calib-sampling", "tiled", "--quiet", "-o",
                  tmp_path / "t.qir")
    assert res.exit_code == 0, (res.stderr, res.exception)
    assert load_ir(tmp_path / "t.qir").provenance["calibration"]["hash"] == info["hash"]


@pytest.mark.slow
def test_imatrix_command_auto_and_file_agree(tiny_llama, calib_file, tmp_path):
    import gguf

    from qexport.calib import load_calibration
    f = tmp_path / "tiny.imatrix.gguf"
    res = run_cli("imatrix", tiny_llama, "--calib", calib_file, "--n-samples", "4", "--seq-len", "32",
                  "--quiet", "-o", f)
    assert res.exit_code == 0, (res.stderr, res.exception)
    r = gguf.GGUFReader(str(f))
    assert r.fields["general.type"].contents() == "imatrix"
    data = {t.name: np.asarray(t.data, np.float32).reshape(-1) for t in r.tensors}
    assert sorted(n for n in data if n.endswith(".in_sum2")) == sorted(
        f"blk.{i}.{g}.weight.in_sum2" for i in range(2) for g in GGUF_LIN)
    assert all(v[0] == 128 for n, v in data.items() if n.endswith(".counts"))
    ids = load_calibration(calib_file, load_model(tiny_llama).tokenizer, n_samples=4, seq_len=32,
                           seed=0)[0]
    want = _hook_imatrix(tiny_llama, ids)
    for g in (n[:-len(".in_sum2")] for n in data if n.endswith(".in_sum2")):
        np.testing.assert_allclose(data[f"{g}.in_sum2"] / 128, want[hf_name(g)], rtol=2e-4,
                                   atol=1e-7, err_msg=g)
    # `--imatrix auto` (same windows) == `--imatrix FILE`, byte for byte
    common = ["--to", "gguf", "--type", "Q4_K_S", "--pure", "--method", "rtn", "--quiet",
              "--n-samples", "4", "--seq-len", "32"]
    assert run_cli("quantize", tiny_llama, *common, "--imatrix", f, "-o",
                   tmp_path / "file.qir").exit_code == 0
    res = run_cli("quantize", tiny_llama, *common, "--imatrix", "auto", "--calib", calib_file,
                  "-o", tmp_path / "auto.qir")
    assert res.exit_code == 0, (res.stderr, res.exception)
    a, b = load_ir(tmp_path / "auto.qir"), load_ir(tmp_path / "file.qir")
    assert all(_same(a.tensors[n], b.tensors[n]) for n in a.tensors)
    assert a.provenance["imatrix"]["sha256"] == b.provenance["imatrix"]["values_sha256"]
    assert a.provenance["imatrix"]["source"] == "auto"
    assert a.provenance["calibration"]["text_sha256"] == hashlib.sha256(
        calib_file.read_bytes()).hexdigest()
    # an existing output is refused without --force
    before = snapshot(tmp_path)
    res = run_cli("imatrix", tiny_llama, "--calib", calib_file, "--n-samples", "4", "--seq-len",
                  "32", "--quiet", "-o", f)
    assert_clean_failure(res, tmp_path, before, str(f), "--force")


def _bad_files(folder: Path, model: Path) -> dict[str, tuple[Path, list[str]]]:
    sums, counts = random_sums(model)
    out: dict[str, tuple[Path, list[str]]] = {}
    (folder / "garbage.gguf").write_bytes(np.random.default_rng(1).bytes(4000))
    out["garbage"] = (folder / "garbage.gguf", ["garbage.gguf", "imatrix"])
    (folder / "empty.gguf").write_bytes(b"")
    out["empty"] = (folder / "empty.gguf", ["empty.gguf"])
    (folder / "trunc.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05" * 40)
    out["truncated"] = (folder / "trunc.gguf", ["trunc.gguf"])
    out["absent"] = (folder / "absent.gguf", ["absent.gguf", "not found"])
    import gguf
    w = gguf.GGUFWriter(str(folder / "model.gguf"), arch="llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out["model-file"] = (folder / "model.gguf", ["model.gguf", "in_sum2"])
    s = dict(sums)
    del s["blk.1.ffn_down.weight"]
    out["missing-entry"] = (write_imatrix(folder / "missing.gguf", s, counts),
                            ["model.layers.1.mlp.down_proj.weight", "no entry"])
    s = dict(sums, **{"blk.0.attn_q.weight": sums["blk.0.attn_q.weight"][:100]})
    out["wrong-length"] = (write_imatrix(folder / "short.gguf", s, counts),
                           ["model.layers.0.self_attn.q_proj.weight", "[256]"])
    s = dict(sums, **{"blk.0.ffn_up.weight": -sums["blk.0.ffn_up.weight"]})
    out["negative"] = (write_imatrix(folder / "neg.gguf", s, counts),
                       ["model.layers.0.mlp.up_proj.weight", "non-negative"])
    return out


BAD = ["garbage", "empty", "truncated", "absent", "model-file", "missing-entry",
       "wrong-length", "negative"]


@pytest.mark.parametrize("case", BAD)
def test_bad_imatrix_file_exit_2_nothing_written(case, tiny_llama, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    path, needles = _bad_files(files, tiny_llama)[case]
    before = snapshot(tmp_path)
    res = run_cli("convert", tiny_llama, "--to", "gguf", "--type", "Q4_K_M", "--method", "rtn",
                  "--imatrix", path, "--quiet", "-o", tmp_path / "m.gguf")
    assert_clean_failure(res, tmp_path, before, *needles)


@pytest.mark.parametrize("args,needles", [
    (["--to", "onnx", "--bits", "4", "--group-size", "32", "--method", "rtn"],
     ["model.layers.0.self_attn.q_proj.weight", "gguf"]),
    (["--to", "gguf", "--type", "Q4_0", "--method", "gptq", "--calib", "CALIB"],
     ["--imatrix", "rtn"]),
], ids=["onnx-target", "gptq"])
def test_imatrix_refused_where_it_cannot_apply(args, needles, tiny_llama, imat, calib_file,
                                               tmp_path):
    before = snapshot(tmp_path)
    args = [str(calib_file) if a == "CALIB" else a for a in args]
    res = run_cli("convert", tiny_llama, *args, "--imatrix", imat["path"], "--quiet",
                  "-o", tmp_path / "out")
    assert_clean_failure(res, tmp_path, before, *needles)
    res = run_cli("quantize", tiny_llama, "--to", "gguf", "--type", "Q4_0", "--method", "rtn",
                  "--imatrix", "auto", "--quiet", "-o", tmp_path / "ir")
    assert_clean_failure(res, tmp_path, before, "--calib")


def test_with_imatrix_recipe_rules():
    """llama-quantize's Q4_0 recipe gives ffn_down of the first n/8 layers Q4_1 only with an
    imatrix; plan_gguf(imatrix=True) follows it."""
    from qexport.specs import plan_gguf
    n, h, f = 16, 256, 512
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": n,
           "num_attention_heads": 4, "num_key_value_heads": 4}
    shape = {"mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    shapes = {f"model.layers.{i}.{m}.weight": shape.get(m, (h, h))
              for i in range(n) for m in GGUF_LIN.values()}
    shapes.update({"model.embed_tokens.weight": (1000, h), "lm_head.weight": (1000, h)})
    down = "model.layers.1.mlp.down_proj.weight"
    assert plan_gguf("Q4_0", cfg, shapes)[down].spec.name == "gguf-q4_0"
    assert plan_gguf("Q4_0", cfg, shapes, imatrix=True)[down].spec.name == "gguf-q4_1"
    assert plan_gguf("Q4_0", cfg, shapes, imatrix=True)[
        "model.layers.2.mlp.down_proj.weight"].spec.name == "gguf-q4_0"


@pytest.mark.parametrize("gguf_type", ["Q4_0", "IQ4_NL", "Q4_K_M"])
def test_calibrated_methods_plan_with_imatrix_rules(tmp_path, tokenizer_dir, gguf_type):
    """gptq / leanquant / tesseraq get llama-quantize's with-imatrix recipe (same tensor types as
    the rtn + imatrix plan, their peer), rtn without an imatrix the plain one."""
    from qexport.commands import build_plan
    from qexport.testing import make_tiny_model
    deep = make_tiny_model(tmp_path / "deep", "llama", hidden=64, intermediate=128, layers=8,
                           heads=2, kv_heads=2, tokenizer_dir=tokenizer_dir)
    src = load_model(deep)
    kw = {"target": "gguf", "gguf_type": gguf_type}

    def types(**extra):
        plan, _ = build_plan(src, {**kw, **extra})
        return {n: p.spec.name for n, p in plan.items()}
    with_im = types(method="rtn", imatrix="some.imatrix.gguf")
    for m in ("gptq", "leanquant", "tesseraq"):
        assert types(method=m) == with_im, m
    # layer 0's ffn_down (i < n/8) differs between the two rule sets of Q4_0 and IQ4_NL
    assert (types(method="rtn") != with_im) == (gguf_type in ("Q4_0", "IQ4_NL"))
