"""The qexport variants of tools/bench_gguf.py (``--methods NAME``): the table of
:data:`QEXPORT_METHODS`, kept apart from the report helpers (tools/bench_gguf_report.py
re-exports it)."""
from __future__ import annotations

from typing import Any

__all__ = ["QEXPORT_METHODS"]

#: qexport's methods in the benchmark: name -> (``qexport --method``, QuantizeOptions overrides,
#: table label, optional). Optional variants run only when named in ``--methods`` and are
#: listed only for the types where they were built: e.g. leanquant-p1 (leanquant's loss-weight
#: exponent, default p = 2) and tesseraq-minmax (TesseraQ on the paper's min-max grid, the
#: default before 2026-11-24).
QEXPORT_METHODS: dict[str, tuple[str, dict[str, Any], str, bool]] = {
    "gptq": ("gptq", {}, "qexport gptq", False),
    "leanquant": ("leanquant", {}, "qexport leanquant (act-order)", False),
    "leanquant-p1": ("leanquant", {"p": 1.0}, "qexport leanquant --p 1 (act-order)", True),
    "leanquant-d01": ("leanquant", {"percdamp": 0.01}, "qexport leanquant --damp 0.01 (act-order)",
                      True),
    "leanquant-r2": ("leanquant", {"refit": 2}, "qexport leanquant --refit 2 (act-order)", True),
    "leanquant-d01-r2": ("leanquant", {"percdamp": 0.01, "refit": 2},
                         "qexport leanquant --damp 0.01 --refit 2 (act-order)", True),
    "leanquant-d003-r2": ("leanquant", {"percdamp": 0.03, "refit": 2},
                          "qexport leanquant --damp 0.03 --refit 2 (act-order)", True),
    "leanquant-d003-r3": ("leanquant", {"percdamp": 0.03, "refit": 3},
                          "qexport leanquant --damp 0.03 --refit 3 (act-order)", True),
    "leanquant-r2-sub": ("leanquant", {"refit": 2, "refit_sub": True},
                         "qexport leanquant --refit 2 --refit-sub (act-order)", True),
    "leanquant-d003-r2-sub": ("leanquant", {"percdamp": 0.03, "refit": 2, "refit_sub": True},
                              "qexport leanquant --damp 0.03 --refit 2 --refit-sub (act-order)",
                              True),
    "leanquant-d01-r2-cd2": ("leanquant", {"percdamp": 0.01, "refit": 2, "cd": 2},
                             "qexport leanquant --damp 0.01 --refit 2 --cd 2 (act-order)", True),
    "leanquant-r2-sub-cd2": ("leanquant", {"refit": 2, "refit_sub": True, "cd": 2},
                             "qexport leanquant --refit 2 --refit-sub --cd 2 (act-order)", True),
    "leanquant-d003-r2-sub-cd2": ("leanquant", {"percdamp": 0.03, "refit": 2, "refit_sub": True,
                                                "cd": 2},
                                  "qexport leanquant --damp 0.03 --refit 2 --refit-sub --cd 2 "
                                  "(act-order)", True),
    "leanquant-asym": ("leanquant", {"asym_calib": True},
                       "qexport leanquant --asym-calib (act-order)", True),
    "leanquant-d01-r2-asym": ("leanquant", {"percdamp": 0.01, "refit": 2, "asym_calib": True},
                              "qexport leanquant --damp 0.01 --refit 2 --asym-calib (act-order)",
                              True),
    "leanquant-dmlp-r2": ("leanquant", {"percdamp": 0.01, "percdamp_mlp": 0.1, "refit": 2},
                          "qexport leanquant --damp 0.01 --damp-mlp 0.1 --refit 2 (act-order)",
                          True),
    "leanquant-d01-r2-tiled": ("leanquant", {"percdamp": 0.01, "refit": 2,
                                             "calib_sampling": "tiled"},
                               "qexport leanquant --damp 0.01 --refit 2 --calib-sampling tiled "
                               "(act-order)", True),
    "leanquant-d003-r2-tiled": ("leanquant", {"percdamp": 0.03, "refit": 2,
                                              "calib_sampling": "tiled"},
                                "qexport leanquant --damp 0.03 --refit 2 --calib-sampling tiled "
                                "(act-order)", True),
    "leanquant-r2-sub-tiled": ("leanquant", {"refit": 2, "refit_sub": True,
                                             "calib_sampling": "tiled"},
                               "qexport leanquant --refit 2 --refit-sub --calib-sampling tiled "
                               "(act-order)", True),
    "leanquant-d01-r2-e2e": ("leanquant", {"percdamp": 0.01, "refit": 2, "e2e_epochs": 1,
                                           "e2e_options": {"holdout": 4}},
                             "qexport leanquant --damp 0.01 --refit 2 --e2e 1 --e2e-holdout 4 "
                             "(act-order)", True),
    "leanquant-d003-r2-e2e": ("leanquant", {"percdamp": 0.03, "refit": 2, "e2e_epochs": 1,
                                            "e2e_options": {"holdout": 4}},
                              "qexport leanquant --damp 0.03 --refit 2 --e2e 1 --e2e-holdout 4 "
                              "(act-order)", True),
    "leanquant-r2-sub-tiled-e2e": ("leanquant", {"refit": 2, "refit_sub": True,
                                                 "calib_sampling": "tiled", "e2e_epochs": 1,
                                                 "e2e_options": {"holdout": 4}},
                                   "qexport leanquant --refit 2 --refit-sub --calib-sampling "
                                   "tiled --e2e 1 --e2e-holdout 4 (act-order)", True),
    "leanquant-r2-sub-tiled-e2e3": ("leanquant", {"refit": 2, "refit_sub": True,
                                                  "calib_sampling": "tiled", "e2e_epochs": 3,
                                                  "e2e_options": {"holdout": 4}},
                                    "qexport leanquant --refit 2 --refit-sub --calib-sampling "
                                    "tiled --e2e 3 --e2e-holdout 4 (act-order)", True),
    "leanquant-r2-sub-tiled-e2e3-lr1e3": ("leanquant", {"refit": 2, "refit_sub": True,
                                                        "calib_sampling": "tiled",
                                                        "e2e_epochs": 3,
                                                        "e2e_options": {"holdout": 4,
                                                                        "lr": 1e-3}},
                                          "qexport leanquant --refit 2 --refit-sub "
                                          "--calib-sampling tiled --e2e 3 --e2e-lr 1e-3 "
                                          "--e2e-holdout 4 (act-order)", True),
    "leanquant-d01-r2-s1": ("leanquant", {"percdamp": 0.01, "refit": 2, "seed": 1},
                            "qexport leanquant --damp 0.01 --refit 2 --seed 1 (act-order)", True),
    "leanquant-d003-r2-s1": ("leanquant", {"percdamp": 0.03, "refit": 2, "seed": 1},
                             "qexport leanquant --damp 0.03 --refit 2 --seed 1 (act-order)", True),
    "tesseraq": ("tesseraq", {}, "qexport tesseraq", False),
    "tesseraq-minmax": ("tesseraq", {"tesseraq": {"grid_init": "minmax"}},
                        "qexport tesseraq --tq-grid-init minmax", True),
}
