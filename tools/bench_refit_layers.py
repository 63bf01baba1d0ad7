"""Layer objectives of LeanQuant with ``--damp`` / ``--refit`` on the sample model, in-sample
(Hessians from the calibration windows) and held out (Hessians from wikitext-2 test windows,
or with ``--heldout c4`` from other windows of the calibration text).

    nice .venv/bin/python tools/bench_refit_layers.py --type Q4_0 --layers 2 [--heldout c4]
    nice .venv/bin/python tools/bench_refit_layers.py --type Q3_K --layers 4 --heldout c4 \
        --linears down_proj --configs 0.1:0,0.1:2,0.1:2:sub

Linears the type cannot hold (a k-quant on a row that is not a multiple of 256) are quantized
on Q4_0, llama.cpp's fallback for them; ``--linears`` picks the ones in the table.

The first ``--layers`` decoder layers are quantized true-sequentially with LeanQuant (act-order,
damp 0.1) on the GGUF type's grid while both Hessians of every linear are collected; then each
configuration re-quantizes every collected linear from its calibration Hessian, and the table
gives ``tr((W - Q) H (W - Q)^T)`` under the held-out Hessian relative to LeanQuant's defaults
(the mean over linears in-sample and held out closes it). A probe, not the PPL benchmark: that
is ``tools/bench_gguf.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QEXPORT_SHARED", REPO.parent / "shared"))
CALIB = SHARED / "data" / "exllamav2-cal" / "c4.utf8"
WIKI = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
#: damp:refit rounds[:sub][:cdP] (sub: --refit-sub, cdP: --cd P); the first, LeanQuant's
#: default, is the reference of every ratio
CONFIGS = "0.1:0,0.03:0,0.01:0,0.1:2,0.01:2"
#: where the held-out Hessians come from: wikitext-2 test (the PPL benchmark's text) or other
#: seeded windows of the calibration text itself (seed 1; the quantizer's are seed 0), which
#: chooses settings without looking at the evaluation text
HELDOUT = {"wiki": (WIKI, 0), "c4": (CALIB, 1)}


class _Stop(Exception):
    pass


def parse_configs(text: str) -> list[tuple[float, int, bool, int, float]]:
    """``"damp:rounds[:sub][:cdP|:cdzP],..."`` -> ``[(damp, refit rounds, --refit-sub, --cd
    passes, cd ridge)]`` (``cdP``: the ridge is ``damp``; ``cdzP``: no ridge)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        sub, cd, cd_damp = False, 0, 0.0
        try:
            damp, rounds = float(parts[0]), int(parts[1])
            for tok in parts[2:]:
                if tok == "sub":
                    sub = True
                elif tok.startswith("cdz"):
                    cd = int(tok[3:])
                elif tok.startswith("cd"):
                    cd, cd_damp = int(tok[2:]), damp
                else:
                    raise ValueError(tok)
        except (IndexError, ValueError):
            raise SystemExit(f"--configs: expected damp:rounds[:sub][:cdP|:cdzP] (not {item!r})")
        out.append((damp, rounds, sub, cd, cd_damp))
    return out


def config_label(cfg: tuple[float, int, bool, int, float]) -> str:
    damp, rounds, sub, cd, cd_damp = cfg
    return (f"damp {damp} refit {rounds}" + (" sub" if sub else "")
            + (f" cd {cd} (ridge {cd_damp})" if cd else ""))


def spec_of(spec, W: np.ndarray):
    """``spec``, or Q4_0 (llama.cpp's fallback) for a row length ``spec`` cannot hold."""
    from backends.gguf.types import spec_for
    from qexport.grids import GridError
    try:
        spec.check_shape(W.shape, "probe")
    except GridError:
        return spec_for("Q4_0")
    return spec


def collect(src, text: Path, spec, n_layers: int, n_samples: int,
            seed: int = 0) -> dict[str, tuple]:
    """``{name: (W, H)}`` of the first ``n_layers`` layers, quantized sequentially."""
    from qexport.calib import load_calibration, quantize_layerwise
    from qexport.methods.leanquant import leanquant_aff_quantize
    samples, _ = load_calibration(str(text), src.tokenizer, n_samples=n_samples, seq_len=512,
                                  seed=seed)
    out: dict[str, tuple] = {}

    def qfn(name, W, H):
        if int(name.split(".")[2]) >= n_layers:
            raise _Stop()
        Wn = W.detach().numpy().astype(np.float32)
        out[name] = (Wn, H.detach().numpy().astype(np.float32).copy())
        res = leanquant_aff_quantize(Wn, H, spec_of(spec, Wn), name=name, p=2.0, percdamp=0.1,
                                     actorder=True)
        return torch.from_numpy(res.dequantize())
    try:
        quantize_layerwise(src, samples, qfn, progress=False, v_hessian="attention")
    except _Stop:
        pass
    return out


def main() -> None:
    sys.path.insert(0, str(REPO))
    from backends.gguf.types import spec_for
    from qexport.grids import dequantize
    from qexport.methods.leanquant import leanquant_aff_quantize
    from qexport.methods.refit import refit_rounds
    from qexport.methods.result import hessian_objective
    from qexport.model.load import load_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--type", default="Q4_0")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--heldout", choices=sorted(HELDOUT), default="wiki",
                    help="held-out Hessians: wikitext-2 test, or c4 windows of another seed")
    ap.add_argument("--linears", default="", help="only linears whose name contains this")
    ap.add_argument("--configs", default=CONFIGS,
                    help="damp:rounds[:sub][:cdP|:cdzP],... (sub: --refit-sub; cdP: --cd P with "
                         "the damp as ridge, cdzP: no ridge); the first is the reference")
    a = ap.parse_args()
    configs = parse_configs(a.configs)
    torch.set_num_threads(2)
    spec = spec_for(a.type)
    src = load_model("sample:smollm2")
    cal = collect(src, CALIB, spec, a.layers, a.n_samples)
    text, seed = HELDOUT[a.heldout]
    held = collect(src, text, spec, a.layers, a.n_samples, seed=seed)
    print(f"| linear ({a.type}) | " + " | ".join(config_label(c) for c in configs) + " |")
    print("|---|" + "---:|" * len(configs))
    rows_in, rows_out = [], []
    for name, (W, H) in cal.items():
        if a.linears not in name:
            continue
        Hw = held[name][1]
        ins, outs = [], []
        sp = spec_of(spec, W)
        for damp, rounds, sub, cd, cd_damp in configs:
            res = leanquant_aff_quantize(W, H, sp, name=name, p=2.0, percdamp=damp,
                                         actorder=True)
            codes, grid = res.codes, res.grid
            if rounds:
                codes, grid, _ = refit_rounds(W, H, codes, grid, sp, rounds, name=name,
                                              percdamp=damp, sub=sub, cd=cd, cd_damp=cd_damp)
            Q = dequantize(codes, grid, sp)
            ins.append(hessian_objective(W, Q, H))
            outs.append(hessian_objective(W, Q, Hw))
        rows_in.append(np.array(ins) / ins[0])
        rows_out.append(np.array(outs) / outs[0])
        short = name.replace("model.layers.", "").replace(".weight", "")
        print(f"| {short} | " + " | ".join(f"{x:.3f}" for x in rows_out[-1]) + " |")
    for label, rows in (("mean, held out", rows_out), ("mean, in-sample", rows_in)):
        print(f"| {label} | " + " | ".join(f"{x:.3f}" for x in np.mean(rows, 0)) + " |")


if __name__ == "__main__":
    main()
