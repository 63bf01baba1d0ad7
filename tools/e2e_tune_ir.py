"""End-to-end tuning of an IR's float grid parameters and norms (qexport.methods.e2e).

    .venv/bin/python tools/e2e_tune_ir.py IN.qir --source sample:smollm2 \
        --calib ../shared/data/exllamav2-cal/c4.utf8 -o OUT.qir [--epochs 1 --lr 5e-4 --granularity row --holdout 4]

Codes and integer fields stay; the provenance records the tuning under ``e2e``. The same stage
runs inside ``qexport quantize/convert --e2e N``; this tool applies it to an existing IR (the
defaults are the CLI's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from qexport.e2e_stage import run_e2e
    from qexport.irio import load_ir, save_ir
    from qexport.model.load import load_model
    from qexport.pipeline import QuantizeOptions
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ir")
    ap.add_argument("--source", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-sampling", choices=("random", "tiled"), default="random")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--train-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--no-norms", action="store_true")
    ap.add_argument("--granularity", choices=("block", "row"), default="row")
    ap.add_argument("--holdout", type=int, default=0,
                    help="windows kept out of training; their KL is printed before/after")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    # the CLI's --e2e stage on an existing IR: only the calibration and e2e fields are read
    opts = QuantizeOptions(calib=a.calib, n_samples=a.n_samples, seq_len=a.seq_len,
                           calib_sampling=a.calib_sampling, e2e_epochs=a.epochs,
                           e2e_options={"batch": a.batch, "train_len": a.train_len, "lr": a.lr,
                                        "norms": not a.no_norms,
                                        "granularity": a.granularity, "holdout": a.holdout})
    qm = run_e2e(load_ir(a.ir), load_model(a.source), opts)
    save_ir(qm, a.output, force=a.force)
    rep = qm.provenance["e2e"]
    print(f"wrote {a.output}: epoch KL {rep['epoch_loss']}, held-out KL "
          f"{rep.get('holdout_kl')}")


if __name__ == "__main__":
    main()
