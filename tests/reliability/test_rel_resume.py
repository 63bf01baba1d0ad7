"""Interrupts and --resume: a signal during `qexport quantize --method gptq` exits 130 with no
artifact; --resume continues from the last finished decoder layer (checkpoints in OUT.partial/)
and gives the same bytes as an uninterrupted run; different settings are refused by name."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clihelp import GPTQ_FAST, interrupted_run, run_cli, snapshot


def _partial(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _layers_done(out: Path) -> int:
    try:
        return int(json.loads((_partial(out) / "manifest.json").read_text())["layers_done"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory, micro_llama: Path, calib_file: Path) -> dict[str, str]:
    """The uninterrupted run's bytes."""
    out = tmp_path_factory.mktemp("ref") / "ref.qir"
    res = run_cli("quantize", micro_llama, *GPTQ_FAST, "--lorc-rank", "2", "--calib", calib_file,
                  "-o", out)
    assert res.exit_code == 0, res.stderr
    return snapshot(out)


def test_interrupt_then_resume_gives_same_bytes(micro_llama: Path, calib_file: Path,
                                                tmp_path: Path, monkeypatch,
                                                reference: dict[str, str]) -> None:
    from qexport import calib
    from qexport.checkpoint import Checkpoint
    out = tmp_path / "m.qir"
    args = ["quantize", micro_llama, *GPTQ_FAST, "--lorc-rank", "2", "--calib", calib_file,
            "-o", out]
    real_save = Checkpoint.save_layer

    def save_then_ctrl_c(self, i, tensors, hidden):
        real_save(self, i, tensors, hidden)
        raise KeyboardInterrupt                     # Ctrl-C right after layer 0 was saved
    monkeypatch.setattr(Checkpoint, "save_layer", save_then_ctrl_c)
    res = run_cli(*args)
    assert res.exit_code == 130, res.stderr
    assert "interrupted" in res.stderr and "--resume" in res.stderr
    assert not out.exists() and _layers_done(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qir.partial"]
    monkeypatch.setattr(Checkpoint, "save_layer", real_save)

    res = run_cli(*args)                            # no --resume: refuses, keeps the work
    assert res.exit_code == 2 and "--resume" in res.stderr and _layers_done(out) == 1

    ran = []
    real_run = calib._run_layer
    monkeypatch.setattr(calib, "_run_layer", lambda layer, h, i, *a: (ran.append(i),
                                                                      real_run(layer, h, i, *a)))
    # offloading the activations changes where they live, not the result: a resume may add it
    res = run_cli(*args, "--resume", "--offload-activations")
    assert res.exit_code == 0, res.stderr
    assert ran == [1], f"resume re-ran layers {ran}"
    assert snapshot(out) == reference
    assert not _partial(out).exists(), "checkpoint folder left after success"


def test_resume_refuses_different_settings(micro_llama: Path, calib_file: Path,
                                           tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m.qir"
    assert interrupted_run(monkeypatch, "quantize", micro_llama, *GPTQ_FAST, "--calib",
                           calib_file, "-o", out).exit_code == 130
    before = snapshot(tmp_path)
    res = run_cli("quantize", micro_llama, *GPTQ_FAST, "--calib", calib_file, "--seed", "1",
                  "--damp", "0.05", "-o", out, "--resume")
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert line.startswith("error:") and "settings differ" in line, line
    assert "options.seed: 0 -> 1" in line, line
    assert "options.percdamp:" in line and "-> 0.05" in line, line
    assert snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory, tokenizer_dir: Path) -> Path:
    from qexport.testing import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("four"), "llama", hidden=64,
                           intermediate=128, layers=4, heads=2, kv_heads=1,
                           tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def four_reference(tmp_path_factory, four_layer: Path, calib_file: Path) -> dict[str, str]:
    out = tmp_path_factory.mktemp("ref4") / "ref.qir"
    res = run_cli("quantize", four_layer, *GPTQ_FAST, "--calib", calib_file, "-o", out)
    assert res.exit_code == 0, res.stderr
    return snapshot(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_gptq_subprocess(four_layer: Path, calib_file: Path, tmp_path: Path,
                                       sig: int, four_reference: dict[str, str]) -> None:
    out = tmp_path / "m.qir"
    args = ["quantize", str(four_layer), *GPTQ_FAST, "--calib", str(calib_file), "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "qexport.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while _layers_done(out) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted: no artifact written" in err and "Traceback" not in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.qir.partial"]
    done = _layers_done(out)
    assert 1 <= done < 4

    res = run_cli(*args, "--resume")                # resume in-process
    assert res.exit_code == 0, res.stderr
    assert snapshot(out) == four_reference
    assert not _partial(out).exists()
