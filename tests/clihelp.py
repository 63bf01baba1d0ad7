"""Helpers for the reliability tests: in-process CLI runs and folder snapshots (to prove that
nothing was written)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

GPTQ_FAST = ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym",
             "--n-samples", "8", "--seq-len", "64", "--quiet"]
RTN_FAST = ["--method", "rtn", "--bits", "4", "--group-size", "32", "--sym", "--quiet"]


def run_cli(*args: Any) -> Result:
    """``qexport ARGS`` in-process; stdout and stderr kept apart."""
    from qexport.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True)


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (also names dot files)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() and not any(p.iterdir()):
            out[str(p.relative_to(folder)) + "/"] = ""
    return out


def assert_clean_failure(res: Result, folder: Path, before: dict[str, str],
                         *needles: str) -> str:
    """Exit 2, exactly one ``error:`` line on stderr (containing ``needles``), no traceback,
    and ``folder`` byte-identical to ``before``. Returns the line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, (res.exit_code, res.stderr, res.stdout)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    assert snapshot(folder) == before, "something was written (or changed)"
    return lines[0]


def interrupted_run(monkeypatch: Any, *args: Any) -> Result:
    """``qexport ARGS`` with a Ctrl-C right after the first decoder layer's checkpoint was
    saved (expected exit 130, the checkpoint kept for ``--resume``)."""
    from qexport.checkpoint import Checkpoint
    real_save = Checkpoint.save_layer

    def save_then_ctrl_c(self, i, tensors, hidden):
        real_save(self, i, tensors, hidden)
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save_layer", save_then_ctrl_c)
        return run_cli(*args)
