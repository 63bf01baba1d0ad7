"""End-to-end tuning of the float grid parameters with the codes fixed (``--e2e N``, run by
:mod:`qexport.e2e_stage`).

Every method above picks codes and scales layer by layer against a *local* objective (the
layer's Hessian, or a block's output). What the runtime's perplexity sees is the model's output
distribution. Once the codes are final, every decoded weight is linear in its grid's float
parameters (the table in :mod:`qexport.methods.refit`: affine scales / mins, k-quant ``d`` /
``dmin`` with the integer sub-scales held, IQ4_NL's block scale), and the RMSNorm weights are
kept in F32 by every target. So the whole quantized model is a differentiable function of
those floats, and they can be trained against the full-precision model's next-token
distribution on the calibration windows:

    loss = mean over tokens of KL(p_fp(. | x) || p_q(. | x))

(EfficientQAT's end-to-end training of the quantization parameters, Chen et al. 2024, with
the FP model as teacher as in knowledge-distillation QAT). Each parameter is trained as a
relative factor ``theta = theta0 * (1 + delta)``, ``delta = 0`` at the start (the start is
the method's model exactly), with Adam and a cosine learning rate over ``epochs`` passes of the
windows in a seeded order. At the end every ``theta`` is rounded to its spec's scale dtype
(fp16) and rebuilt into a grid of the same kind, with the same integer fields: the codes,
zero points and sub-scales never change, so every artifact holds the result exactly and the
bits per weight are unchanged. LoRC factors, when present, take part in the forward, fixed.

Written by hand: no library trains k-quant super-block scales through a model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from qexport.errors import InputError, NumericsError, UnsupportedError
from qexport.grids import GridKind, validate
from qexport.grids.grid import grid_from_arrays
from qexport.grids.spec import round_to_dtype
from qexport.ir import QTensor
from qexport.methods.refit import _families
from qexport.methods.tesseraq.block import torch_threads
from qexport.model.arch import layer_prefix
from qexport.model.forward import DecoderLayer, RMSNorm, Rotary

__all__ = ["E2EOptions", "e2e_tune", "check_e2e_spec", "GRANULARITIES"]

#: what one trained factor covers: one grid float, or one output row of a grid family
GRANULARITIES = ("block", "row")


@dataclass
class E2EOptions:
    """Hyper-parameters (recorded in the IR's provenance).

    epochs: passes over the calibration windows (0: off); batch: windows per Adam step;
    train_len: tokens of each window trained on (a prefix; 0: the whole window); lr:
    Adam's learning rate of the relative factors ``delta`` (cosine-decayed to 0); norms: also
    train the RMSNorm weights (each layer's two and the final norm) the same way; seed: the
    window order; threads: torch threads (fixed, so that the result does not depend on the
    machine's core count); granularity: ``block`` trains every float of every grid (one
    factor per scale), ``row`` one factor per output row and family (all of a row's scales
    move together: far fewer parameters, less noise per step); holdout: the last ``holdout``
    windows are not trained on, and their KL is reported before and after (0: none).
    """

    epochs: int = 1
    batch: int = 4
    train_len: int = 256
    lr: float = 5e-4
    norms: bool = True
    seed: int = 0
    threads: int | None = 2
    granularity: str = "row"
    holdout: int = 0
    progress: bool = True

    def check(self) -> None:
        if self.epochs < 0 or self.batch < 1 or not self.lr > 0:
            raise InputError(f"e2e tuning expected epochs >= 0, batch >= 1 and lr > 0 (not "
                             f"{self.epochs}, {self.batch}, {self.lr})")
        if self.granularity not in GRANULARITIES:
            raise InputError(f"e2e granularity expected one of {', '.join(GRANULARITIES)} "
                             f"(not {self.granularity!r})")
        if self.holdout < 0:
            raise InputError(f"e2e holdout expected >= 0 windows (not {self.holdout})")

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("progress", "threads")}


def check_e2e_spec(qt: QTensor) -> None:
    """Raise UnsupportedError (naming the tensor) for grids whose floats are not trained."""
    if qt.spec.kind == GridKind.CODEBOOK and qt.spec.free_codebook:
        raise UnsupportedError(f"{qt.name}: --e2e trains affine, super-block and fixed-table "
                               f"grids (not the free codebook {qt.spec.name})")


class _TunedTensor(torch.nn.Module):
    """One quantized weight as ``sum_f A_f * expand(theta0_f * (1 + delta_f)) [+ A B]``:
    ``A_f`` float32 ``[out, in]`` fixed coefficients (codes, sub-scales), ``theta0_f``
    float32 ``[out, P_f]`` the grid's floats, ``delta_f`` the trained relative factors."""

    def __init__(self, qt: QTensor, granularity: str = "block") -> None:
        super().__init__()
        check_e2e_spec(qt)
        self.qt = qt
        old = qt.grid.arrays()
        self.names: list[str] = []
        self.lens: list[int] = []
        for i, (nm, coef, L) in enumerate(_families(qt.codes, qt.grid, qt.spec)):
            self.names.append(nm)
            self.lens.append(L)
            self.register_buffer(f"coef{i}", torch.from_numpy(coef.astype(np.float32)))
            self.register_buffer(f"theta{i}", torch.from_numpy(old[nm].astype(np.float32)))
            th = getattr(self, f"theta{i}")
            shape = th.shape if granularity == "block" else (th.shape[0], 1)
            setattr(self, f"delta{i}", torch.nn.Parameter(torch.zeros(shape)))
        res = qt.residual.matrix() if qt.residual is not None else None
        self.register_buffer("res", None if res is None else torch.from_numpy(res))

    def theta(self, i: int) -> torch.Tensor:
        """float32 ``[out, P_i]`` (a ``row`` factor ``[out, 1]`` broadcasts)."""
        return getattr(self, f"theta{i}") * (1 + getattr(self, f"delta{i}"))

    def weight(self) -> torch.Tensor:
        out_f, in_f = self.qt.codes.shape
        w = None
        for i, L in enumerate(self.lens):
            th = self.theta(i)              # expand + reshape: its backward is a plain sum
            ex = th[:, :, None].expand(out_f, th.shape[1], L).reshape(out_f, -1)[:, :in_f]
            t = ex * getattr(self, f"coef{i}")
            w = t if w is None else w + t
        return w if self.res is None else w + self.res

    def export(self) -> QTensor:
        """The QTensor with the trained floats rounded to the spec's scale dtype (a factor that
        overflows it keeps its old value); codes and integer fields unchanged."""
        new = dict(self.qt.grid.arrays())
        for i, nm in enumerate(self.names):
            with torch.no_grad():
                th = self.theta(i).numpy().astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                r = round_to_dtype(th, self.qt.spec.scale_dtype)
            new[nm] = np.where(np.isfinite(r), r, new[nm]).astype(np.float32)
        grid = grid_from_arrays(self.qt.grid.kind, new, self.qt.name)
        validate(self.qt.codes, grid, self.qt.spec, self.qt.name)
        return QTensor(self.qt.name, self.qt.codes, grid, self.qt.spec, self.qt.residual,
                       dict(self.qt.stats))


class _Norm(torch.nn.Module):
    def __init__(self, w: np.ndarray, train: bool) -> None:
        super().__init__()
        self.register_buffer("w0", torch.from_numpy(np.array(w, dtype=np.float32)))
        self.delta = torch.nn.Parameter(torch.zeros_like(self.w0), requires_grad=train)

    def weight(self) -> torch.Tensor:
        return self.w0 * (1 + self.delta)


def _kl(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """mean over tokens of KL(softmax(t) || softmax(s)); float32 logits ``[B, T, V]``."""
    lt = F.log_softmax(t_logits.flatten(0, 1), -1)
    ls = F.log_softmax(s_logits.flatten(0, 1), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean")


class _Student(torch.nn.Module):
    """The quantized model as a function of the trained factors. ``layers`` (the teacher's
    modules) only give the forward's structure: every tensor of a layer is passed in, the
    quantized linears from their factors, the norms trained, the rest (biases) from
    ``src`` (the quantized model's passthrough tensors)."""

    def __init__(self, src: Any, tensors: Mapping[str, QTensor], layers: list[DecoderLayer],
                 train_norms: bool, granularity: str = "block") -> None:
        super().__init__()
        self.arch = src.arch
        self.layers_fp = layers
        self.tuned = torch.nn.ModuleDict()
        self.keys: dict[str, str] = {}
        for name, qt in tensors.items():
            self.keys[name] = _key(name)
            self.tuned[_key(name)] = _TunedTensor(qt, granularity)
        norms = set(_norm_names(src.arch))
        self.norms = torch.nn.ModuleDict({_key(n): _Norm(src.get(n), train_norms)
                                          for n in sorted(norms)})
        self.fixed: dict[str, torch.Tensor] = {}
        for n in src.tensor_names():
            if n not in self.keys and n not in norms:
                self.fixed[n] = torch.from_numpy(src.get(n))

    def tensor(self, name: str) -> torch.Tensor:
        if name in self.keys:
            return self.tuned[self.keys[name]].weight()
        if _key(name) in self.norms:
            return self.norms[_key(name)].weight()
        return self.fixed[name]

    def forward(self, ids: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        emb = self.tensor("model.embed_tokens.weight")
        h = F.embedding(ids, emb)
        for i, layer in enumerate(self.layers_fp):
            p = layer_prefix(i)
            params = {n[len(p):]: self.tensor(n) for n in self.arch.layer_shapes(i)}
            h = torch.func.functional_call(layer, params, (h, rope))
        norm = self.tensor("model.norm.weight")
        var = h.pow(2).mean(-1, keepdim=True)
        hn = norm * (h * torch.rsqrt(var + self.arch.rms_eps))
        head = emb if self.arch.tie_word_embeddings else self.tensor("lm_head.weight")
        return F.linear(hn, head)


def _key(name: str) -> str:
    return name.replace(".", "__")


def _norm_names(arch: Any) -> list[str]:
    out = []
    for i in range(arch.n_layers):
        p = layer_prefix(i)
        out += [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
    return out + ["model.norm.weight"]


def _teacher(src: Any) -> tuple[list[DecoderLayer], Callable[[torch.Tensor, Any], torch.Tensor]]:
    layers = [DecoderLayer(src.layer_weights(i), src.arch, i) for i in range(src.arch.n_layers)]
    embed = torch.from_numpy(src.get("model.embed_tokens.weight"))
    head = embed if src.arch.tie_word_embeddings else torch.from_numpy(src.get("lm_head.weight"))
    norm = RMSNorm(torch.from_numpy(src.get("model.norm.weight")), src.arch.rms_eps)

    @torch.no_grad()
    def logits(ids: torch.Tensor, rope: Any) -> torch.Tensor:
        h = F.embedding(ids, embed)
        for layer in layers:
            h = layer(h, rope)
        return F.linear(norm(h), head)
    return layers, logits


def e2e_tune(teacher_src: Any, src: Any, tensors: Mapping[str, QTensor], samples: torch.Tensor,
             opts: E2EOptions) -> tuple[dict[str, QTensor], dict[str, np.ndarray], dict[str, Any]]:
    """Train the float parameters of ``tensors`` (and the norms) end to end.

    Args:
        teacher_src: the full-precision SourceModel (the teacher).
        src: the quantized model's source of passthrough tensors (norms, biases): usually
            ``teacher_src``; TesseraQ's AWQ-folded one after tesseraq.
        tensors: every quantized tensor of the model by HF name (codes final).
        samples: int64 ``[N, T]`` calibration windows (the first ``opts.train_len`` tokens of
            each are used; 0: all).
    Returns:
        ``(tensors, norm_updates, report)``: new QTensors (same codes, same integer fields),
        the trained norm weights (float32 by HF name; empty unless ``opts.norms``), and
        ``{"options", "epoch_loss"[, "holdout_kl"]}`` (mean KL per epoch, nats/token;
        with ``opts.holdout``, ``{"before", "after"}`` on the held-out full windows;
        deterministic).
    Raises:
        NumericsError: the loss became NaN/inf.
    """
    opts.check()
    T = samples.shape[1] if opts.train_len <= 0 else min(opts.train_len, samples.shape[1])
    if opts.holdout >= samples.shape[0]:
        raise InputError(f"e2e holdout expected fewer than the {samples.shape[0]} windows "
                         f"(not {opts.holdout})")
    held = samples[samples.shape[0] - opts.holdout:] if opts.holdout else samples[:0]
    samples = samples[:samples.shape[0] - opts.holdout, :T]
    with torch_threads(opts.threads):
        layers, teacher = _teacher(teacher_src)
        student = _Student(src, tensors, layers, opts.norms, opts.granularity)
        held_before = _held_kl(teacher, student, held, src.arch, opts.batch)
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=opts.lr)
        n = samples.shape[0]
        steps_per_epoch = math.ceil(n / opts.batch)
        total = steps_per_epoch * opts.epochs
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / max(total, 1))))
        rope = Rotary(src.arch)(T)
        gen = torch.Generator().manual_seed(opts.seed)
        losses: list[float] = []
        bar = tqdm(total=total, desc="e2e", unit="step", disable=not opts.progress)
        for ep in range(opts.epochs):
            order = torch.randperm(n, generator=gen)
            acc = 0.0
            for s in range(steps_per_epoch):
                ids = samples[order[s * opts.batch:(s + 1) * opts.batch]]
                loss = _kl(teacher(ids, rope), student(ids, rope))
                if not torch.isfinite(loss):
                    raise NumericsError(f"e2e tuning: loss became {float(loss)} at epoch {ep} "
                                        f"step {s} (expected finite; lower --e2e-lr)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                acc += float(loss.detach())
                bar.update(1)
                bar.set_postfix(kl=f"{acc / (s + 1):.4f}")
            losses.append(round(acc / steps_per_epoch, 6))
        bar.close()
        out = {name: student.tuned[key].export() for name, key in student.keys.items()}
        held_after = _held_kl(teacher, student, held, src.arch, opts.batch)
        norms: dict[str, np.ndarray] = {}
        if opts.norms:
            with torch.no_grad():
                for name in _norm_names(src.arch):
                    norms[name] = student.tensor(name).numpy().astype(np.float32)
    for qt in out.values():
        qt.stats["e2e"] = opts.epochs
    report: dict[str, Any] = {"options": opts.record(), "epoch_loss": losses}
    if opts.holdout:
        report["holdout_kl"] = {"before": held_before, "after": held_after}
    return out, norms, report


@torch.no_grad()
def _held_kl(teacher: Callable, student: "_Student", held: torch.Tensor, arch: Any,
             batch: int) -> float | None:
    """Mean KL (nats/token) of ``student`` (unrounded factors) to ``teacher`` on the held-out
    windows int64 ``[H, T]``; None when there are none."""
    if held.shape[0] == 0:
        return None
    rope = Rotary(arch)(held.shape[1])
    tot = 0.0
    for s in range(0, held.shape[0], batch):
        ids = held[s:s + batch]
        tot += float(_kl(teacher(ids, rope), student(ids, rope))) * ids.shape[0]
    return round(tot / held.shape[0], 6)
