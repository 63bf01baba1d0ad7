"""TesseraQ (Li & Panda, arXiv 2410.19103): AWQ initialisation, then block-wise progressive
adaptive rounding (PAR) with dequantization scale tuning (DST), onto the target GridSpec."""
from .awq import AwqConfig, awq_block, clip_weight, fake_quant, fold_scales, scale_candidates
from .driver import THRESHOLDS, TesseraQOptions, tesseraq_quantize_model
from .levels import dst_grid, fit_grid, neighbors
from .par import RoundingVars, rect_sigmoid, rect_sigmoid_inv

__all__ = ["AwqConfig", "RoundingVars", "THRESHOLDS", "TesseraQOptions", "awq_block",
           "clip_weight", "dst_grid", "fake_quant", "fit_grid", "fold_scales", "neighbors",
           "rect_sigmoid", "rect_sigmoid_inv", "scale_candidates", "tesseraq_quantize_model"]
