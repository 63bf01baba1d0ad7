"""Per-tensor dampening (``--damp`` / ``--damp-mlp``) of the layer-wise quantizers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clihelp import assert_clean_failure, run_cli, snapshot

from qexport import layer_quantizer as lq
from qexport.pipeline import QuantizeOptions

ATTN, MLP = "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"


@pytest.mark.parametrize("kw,attn,mlp", [
    ({"method": "gptq"}, 0.01, 0.01),
    ({"method": "leanquant"}, 0.1, 0.1),
    ({"method": "leanquant", "percdamp": 0.01}, 0.01, 0.01),
    ({"method": "leanquant", "percdamp": 0.01, "percdamp_mlp": 0.1}, 0.01, 0.1),
    ({"method": "gptq", "percdamp_mlp": 0.2}, 0.01, 0.2),
])
def test_percdamp_by_tensor(kw, attn, mlp) -> None:
    opts = QuantizeOptions(**kw)
    assert (lq.percdamp(opts, ATTN), lq.percdamp(opts, MLP)) == (attn, mlp)


def test_quantizer_uses_each_tensors_damp(monkeypatch) -> None:
    """The method and the re-fit both get the tensor's own damp; other tensors are unaffected
    (the attention result is the one a plain ``--damp 0.01`` run gives, bit for bit)."""
    from qexport.specs import resolve_spec
    seen: list[tuple[str, float]] = []
    real = lq._method_quantizer

    def spy(opts, damp):
        f = real(opts, damp)
        return lambda W, H, spec, name: (seen.append((name, damp)), f(W, H, spec, name))[1]
    monkeypatch.setattr(lq, "_method_quantizer", spy)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 64)).astype(np.float32)
    H = (2 / 256 * X.T @ X).astype(np.float32)
    W = rng.standard_normal((16, 64)).astype(np.float32)
    spec = resolve_spec("affine-w3g32a")
    split = lq.layer_quantizer(QuantizeOptions(method="leanquant", percdamp=0.01,
                                               percdamp_mlp=0.1, refit=1))
    plain = lq.layer_quantizer(QuantizeOptions(method="leanquant", percdamp=0.01, refit=1))
    a, m = split(W, H, spec, ATTN), split(W, H, spec, MLP)
    assert seen == [(ATTN, 0.01), (MLP, 0.1)]
    b = plain(W, H, spec, ATTN)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, m.codes)


def test_damp_mlp_refused_with_tesseraq(tiny_llama: Path, calib_file: Path,
                                        tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    res = run_cli("quantize", tiny_llama, "--method", "tesseraq", "--damp-mlp", "0.1",
                  "--calib", calib_file, "--quiet", "-o", tmp_path / "x.qir")
    assert_clean_failure(res, tmp_path, before, "--damp-mlp")
