"""The work behind the CLI verbs, callable from Python (tools/ and tests use these)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import click

from qexport.errors import InputError, UnsupportedError
from qexport.ir import QModel
from qexport.pipeline import CALIBRATED, QuantizeOptions, quantize_model
from qexport.specs import (TensorPlan, codebook_spec, linear_names, plan_gguf, plan_uniform,
                           resolve_spec, target_spec)

__all__ = ["build_plan", "build_ir", "print_report", "run_eval", "model_shapes",
           "tesseraq_overrides", "TQ_CLI", "e2e_overrides", "E2E_CLI"]

#: CLI option (click keyword) -> TesseraQOptions field; None (not given) keeps the default
TQ_CLI = {"tq_schedule": "thresholds", "tq_steps": "iterations", "tq_lr": "lr",
          "tq_scale_lr": "scale_lr", "tq_batch": "batch_size", "tq_train_len": "train_len",
          "tq_dst": "dst", "tq_awq_grid": "awq_grid", "tq_grid_init": "grid_init",
          "tq_rounding_init": "rounding_init", "tq_lorc": "lorc", "no_awq": "awq",
          "no_clip": "clip"}


def model_shapes(src: Any) -> dict[str, tuple[int, int]]:
    """[out, in] of every quantizable 2-D tensor (decoder linears, embeddings, lm_head)."""
    a = src.arch
    hd = a.head_dim
    per_layer = {"self_attn.q_proj": (a.n_heads * hd, a.hidden),
                 "self_attn.k_proj": (a.n_kv_heads * hd, a.hidden),
                 "self_attn.v_proj": (a.n_kv_heads * hd, a.hidden),
                 "self_attn.o_proj": (a.hidden, a.n_heads * hd),
                 "mlp.gate_proj": (a.intermediate, a.hidden),
                 "mlp.up_proj": (a.intermediate, a.hidden),
                 "mlp.down_proj": (a.hidden, a.intermediate)}
    shapes = {f"model.layers.{i}.{k}.weight": v for i in range(a.n_layers)
              for k, v in per_layer.items()}
    shapes["model.embed_tokens.weight"] = (a.vocab, a.hidden)
    if not a.tie_word_embeddings:
        shapes["lm_head.weight"] = (a.vocab, a.hidden)
    return shapes


def _overrides(items: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise InputError(f"--override expected REGEX=TYPE (not {it!r})")
        rx, typ = it.rsplit("=", 1)
        try:
            re.compile(rx)
        except re.error as e:
            raise InputError(f"--override {it!r}: bad regex ({e})") from e
        out[rx] = typ
    return out


def build_plan(src: Any, kw: dict[str, Any]) -> tuple[dict[str, TensorPlan], dict[str, Any]]:
    """Per-tensor GridSpecs from the CLI options, and the recipe summary to record."""
    names = linear_names(int(src.arch.n_layers))
    target = kw.get("target", "ir")
    if kw.get("method") == "leanquant-nu" and not kw.get("grid"):
        if target != "ir":
            raise UnsupportedError(f"--method leanquant-nu learns free per-row codebooks, which "
                                   f"--to {target} cannot hold; use --to ir, or --method "
                                   "leanquant (affine / k-quant / IQ4_NL grids) for a runtime")
        spec = codebook_spec(kw["bits"])
        return plan_uniform(names, spec), {"name": spec.name, "target": target}
    if kw.get("grid"):
        spec = resolve_spec(kw["grid"])
        return plan_uniform(names, spec), {"name": spec.name, "target": target}
    if target == "gguf":
        if not kw.get("gguf_type"):
            raise InputError("--to gguf needs --type (e.g. Q4_K_M, Q4_0, IQ4_XS)")
        # llama-quantize's with-imatrix rules whenever activations inform the codes (an
        # imatrix, or a calibrated method), so that the peer is llama-quantize --imatrix
        imatrix = bool(kw.get("imatrix")) or kw.get("method") in CALIBRATED
        plan = plan_gguf(kw["gguf_type"], src.config, model_shapes(src),
                         pure=kw.get("pure", False), overrides=_overrides(kw.get("override", ())),
                         imatrix=imatrix)
        return plan, {"name": kw["gguf_type"].upper(), "target": "gguf",
                      "pure": kw.get("pure", False), "overrides": list(kw.get("override", ())),
                      "imatrix": imatrix}
    spec = target_spec(target, kw["bits"], kw["group_size"], kw["sym"], fmt=kw.get("fmt", "ct"))
    return plan_uniform(names, spec), {"name": spec.name, "target": target}


def _schedule(text: str) -> str | list[float]:
    """``--tq-schedule``: ``10`` / ``20`` (named schedules) or comma-separated thresholds."""
    if text.strip() in ("10", "20"):
        return text.strip()
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--tq-schedule expected 10, 20 or comma-separated thresholds such as "
                         f"0.5,0.25,0.1 (not {text!r})") from None


def tesseraq_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """TesseraQOptions fields set by the CLI options in ``kw`` (only those given)."""
    out: dict[str, Any] = {}
    for opt, fld in TQ_CLI.items():
        v = kw.get(opt)
        if v is None or v is False or v == "auto":
            continue
        if opt == "tq_schedule":
            v = _schedule(v)
        elif opt == "tq_dst":
            v = v == "on"
        elif opt in ("no_awq", "no_clip"):
            v = False
        out[fld] = v
    return out


#: CLI option (click keyword) -> E2EOptions field (qexport.e2e_stage); None keeps the default
E2E_CLI = {"e2e_lr": "lr", "e2e_granularity": "granularity", "e2e_batch": "batch",
           "e2e_train_len": "train_len", "e2e_holdout": "holdout", "e2e_no_norms": "norms"}


def e2e_overrides(kw: dict[str, Any]) -> dict[str, Any]:
    """E2EOptions fields set by the ``--e2e-*`` CLI options in ``kw`` (only those given)."""
    out: dict[str, Any] = {}
    for opt, fld in E2E_CLI.items():
        v = kw.get(opt)
        if v is None or v is False:
            continue
        out[fld] = False if opt == "e2e_no_norms" else v
    return out


def build_ir(model_src: str, kw: dict[str, Any], checkpoint: Any = None,
             stream_to: str | Path | None = None) -> QModel:
    """Load ``model_src``, plan per-tensor grids from CLI-style options, quantize
    (``checkpoint``: see :func:`qexport.pipeline.quantize_model`).

    With a checkpoint (the CLI) or ``stream_to``, every finished tensor is written at once to a
    staging folder beside ``stream_to`` (default: the checkpoint's output) and dropped from
    memory (:mod:`qexport.irstream`); the returned QModel reads its tensors from there, and
    ``save_ir`` of it writes the IR without loading them. The staging folder is removed on
    failure, after ``save_ir``, or when the QModel is garbage-collected.
    """
    from qexport.model.load import load_model
    tq = tesseraq_overrides(kw)
    if tq and kw.get("method") != "tesseraq":
        given = [f"--{k.replace('_', '-')}" for k in TQ_CLI if k in kw and
                 kw[k] not in (None, False, "auto")]
        raise UnsupportedError(f"{', '.join(given)}: tesseraq options, expected with --method "
                               f"tesseraq (not {kw.get('method')})")
    src = load_model(model_src)
    plan, recipe = build_plan(src, kw)
    fields = {f.name for f in dataclasses.fields(QuantizeOptions)}
    mapping = {"damp": "percdamp", "damp_mlp": "percdamp_mlp", "block_size": "blocksize",
               "e2e": "e2e_epochs"}
    opts = QuantizeOptions(**{mapping.get(k, k): v for k, v in kw.items()
                              if mapping.get(k, k) in fields})
    opts.progress = not kw.get("quiet", False)
    opts.tesseraq = tq
    opts.e2e_options = e2e_overrides(kw)
    if stream_to is None and checkpoint is not None:
        stream_to = getattr(checkpoint, "out", None)
    sink = None
    if stream_to is not None:
        from qexport.irstream import IRStreamWriter
        sink = IRStreamWriter(stream_to)
        if checkpoint is not None:
            checkpoint.sink = sink
    try:
        qm = quantize_model(src, plan, opts, checkpoint=checkpoint, sink=sink)
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    qm.recipe.update(recipe)
    return qm


def _report_dict(report: Any) -> dict[str, Any]:
    if isinstance(report, dict):
        return report
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    raise TypeError(f"unexpected verify report type {type(report).__name__}")


def print_report(report: Any, as_json: bool) -> bool:
    """Print a backend's verify report (table or JSON); return whether it passed."""
    d = _report_dict(report)
    ok = bool(d.get("ok"))
    if as_json:
        click.echo(json.dumps(d, indent=1, default=str))
        return ok
    rows = d.get("rows") or d.get("tensors") or []
    if rows:
        keys = [k for k in rows[0].keys()]
        click.echo("  ".join(keys))
        for r in rows:
            click.echo("  ".join(str(r.get(k, "")) for k in keys))
    for k, v in d.items():
        if k not in ("rows", "tensors"):
            click.echo(f"{k}: {v}")
    click.echo("OK: artifact matches the IR" if ok else "MISMATCH: artifact differs from the IR")
    return ok


_ONNX_NOT_TOKENIZER = ("model.onnx", "genai_config.json", "qexport_onnx.json")


def _eval_onnx(folder: Path, text: str, ctx: int, windows: int | None, progress: bool,
               device: str) -> dict[str, Any]:
    """Perplexity through onnxruntime (``device``: auto = CUDA EP when usable, else CPU)."""
    import onnxruntime as ort

    from qexport.backends.onnx.runner import OnnxDecoder
    from qexport.eval import load_eval_text, perplexity
    dec = OnnxDecoder(folder / "model.onnx", device=device)
    tok_files = {f.name: f.read_bytes() for f in sorted(folder.iterdir())
                 if f.is_file() and not f.name.startswith(_ONNX_NOT_TOKENIZER)}
    res = perplexity(lambda b: dec.logits(b.tolist()), load_eval_text(text, tok_files), ctx=ctx,
                     n_windows=windows, progress=progress)
    return {**res, "runtime": f"onnxruntime {ort.__version__}", "provider": dec.provider}


def run_eval(model: str, text: str, ctx: int, windows: int | None,
             progress: bool = True, device: str = "auto", lorc: bool = True) -> dict[str, Any]:
    """Perplexity of a source model or IR folder with qexport's torch forward, or of an ONNX
    folder through onnxruntime (``device`` picks its execution provider; the result names the
    one that ran). ``lorc=False``: an IR's base weights without their LoRC factors."""
    from qexport.eval import load_eval_text, perplexity
    from qexport.model.forward import build_causal_lm
    p = Path(model)
    is_ir = (p / "manifest.json").is_file()
    if not lorc and not is_ir:
        raise click.UsageError(f"--no-lorc: expected an IR folder (one with manifest.json), "
                               f"not {model}")
    if (p / "model.onnx").is_file():
        return _eval_onnx(p, text, ctx, windows, progress, device)
    if is_ir:
        from qexport.irio import load_ir
        qm = load_ir(p)
        config, sd, tok_files = qm.config, qm.state_dict(with_residual=lorc), qm.tokenizer
    else:
        from qexport.model.load import load_model
        src = load_model(model)
        config, sd, tok_files = src.config, src.state_dict(), src.tokenizer
    lm = build_causal_lm(config, sd)
    res = perplexity(lm, load_eval_text(text, tok_files), ctx=ctx, n_windows=windows,
                     progress=progress)
    return {**res, "runtime": "qexport torch forward (fp32)", "provider": "torch CPU",
            **({} if lorc else {"lorc": "left out (--no-lorc)"})}
