"""End-to-end tuning (qexport.methods.e2e): codes and integer fields stay, grids stay valid,
the run is deterministic, and the tuned model's KL to the FP model on its windows falls."""
import numpy as np
import torch

from qexport.calib import load_calibration
from qexport.methods.e2e import E2EOptions, _kl, _Student, _teacher, e2e_tune
from qexport.model.forward import Rotary
from qexport.model.load import load_model
from qexport.pipeline import QuantizeOptions, quantize_model
from qexport.specs import linear_names, plan_uniform, target_spec


def _setup(tiny_llama, calib_file):
    src = load_model(tiny_llama)
    qm = quantize_model(src, plan_uniform(linear_names(src.arch.n_layers),
                                                     target_spec("ir", 3, 16, False)),
                        QuantizeOptions(method="rtn", progress=False))
    ids, _ = load_calibration(calib_file, src.tokenizer, n_samples=4, seq_len=32)
    return src, qm, ids


def _kl_of(src, tensors, norms, ids):
    layers, teacher = _teacher(src)
    st = _Student(src, tensors, layers, False)
    with torch.no_grad():
        for n, w in norms.items():
            st.norms[n.replace(".", "__")].w0.copy_(torch.from_numpy(w))
        rope = Rotary(src.arch)(ids.shape[1])
        return float(_kl(teacher(ids, rope), st(ids, rope)))


def test_e2e_keeps_codes_and_lowers_kl(tiny_llama, calib_file):
    src, qm, ids = _setup(tiny_llama, calib_file)
    opts = E2EOptions(epochs=8, batch=2, lr=3e-3, train_len=0, progress=False,
                      granularity="block")
    out, norms, rep = e2e_tune(src, src, qm.tensors, ids, opts)
    out2, norms2, _ = e2e_tune(src, src, qm.tensors, ids, opts)
    assert len(rep["epoch_loss"]) == 8
    for name, qt in out.items():
        old = qm.tensors[name]
        assert np.array_equal(qt.codes, old.codes)
        qt.validate()
        for k, v in old.grid.arrays().items():
            if v.dtype != np.float32:
                assert np.array_equal(qt.grid.arrays()[k], v), (name, k)
        for k, v in qt.grid.arrays().items():
            assert np.array_equal(v, out2[name].grid.arrays()[k]), (name, k)
    assert all(np.array_equal(norms[n], norms2[n]) for n in norms)
    before = _kl_of(src, qm.tensors, {}, ids)
    after = _kl_of(src, out, norms, ids)
    assert after < 0.9 * before, (before, after)


def test_e2e_row_granularity_moves_whole_rows_and_reports_holdout(tiny_llama, calib_file):
    src, qm, ids = _setup(tiny_llama, calib_file)
    opts = E2EOptions(epochs=8, batch=1, lr=3e-3, train_len=0, progress=False,
                      granularity="row", holdout=1, norms=False)
    out, norms, rep = e2e_tune(src, src, qm.tensors, ids, opts)
    assert norms == {}
    held = rep["holdout_kl"]
    assert held["before"] > 0 and held["after"] is not None
    moved = 0
    for name, qt in out.items():
        old = qm.tensors[name].grid.arrays()["scales"].astype(np.float64)
        new = qt.grid.arrays()["scales"].astype(np.float64)
        ratio = np.divide(new, old, out=np.ones_like(new), where=old != 0)
        # one factor per row: every scale of a row moved by the same ratio, up to fp16 rounding
        spread = ratio.max(1) - ratio.min(1)
        assert (spread <= 2e-3 * ratio.max(1)).all(), name
        moved += int((np.abs(ratio - 1) > 1e-3).any())
    assert moved > 0
    before = _kl_of(src, qm.tensors, {}, ids[:3])
    after = _kl_of(src, out, {}, ids[:3])
    assert after < before, (before, after)


def test_e2e_rejects_bad_granularity_and_holdout(tiny_llama, calib_file):
    import pytest

    from qexport.errors import InputError
    src, qm, ids = _setup(tiny_llama, calib_file)
    with pytest.raises(InputError, match="granularity expected one of block, row"):
        e2e_tune(src, src, qm.tensors, ids, E2EOptions(granularity="col", progress=False))
    with pytest.raises(InputError, match="fewer than the 4 windows"):
        e2e_tune(src, src, qm.tensors, ids, E2EOptions(holdout=4, progress=False))
