"""Calibration: token windows of a text file (:mod:`qexport.calib_text`, re-exported) and the
layer-by-layer driver that feeds each linear's Hessian to a quantizer (GPTQ's true-sequential
scheme).

The driver keeps one decoder layer's activations (the residual stream ``h [N, T, hidden]`` plus
at most one cached group input) in memory. For layer ``i`` and each group of
:data:`qexport.model.LINEAR_GROUPS` it runs the layer only as far as that group's input,
accumulating ``H = 2/N * sum_seq sum_tok x x^T`` (fp32, GPTQ's running average over the N
sequences seen), calls ``quantize_fn`` for every linear of the group and installs the returned
dequantized weight before moving on. The next layer sees the *quantized* layer's outputs.
"""
from __future__ import annotations

import ctypes
import mmap
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from qexport.calib_text import CALIB_SAMPLING, calibration_hash, load_calibration
from qexport.errors import InputError, NumericsError
from qexport.model.arch import LINEAR_GROUPS, layer_prefix

__all__ = ["load_calibration", "calibration_hash", "HessianAccumulator", "quantize_layerwise",
           "QuantizeFn", "V_HESSIANS", "CALIB_SAMPLING"]

#: Hessians available for v_proj (see quantize_layerwise)
V_HESSIANS = ("plain", "attention")

QuantizeFn = Callable[[str, torch.Tensor, torch.Tensor], "torch.Tensor | np.ndarray"]


class HessianAccumulator:
    """GPTQ's ``add_batch``: ``H <- H*n/(n+b) + 2/(n+b) * X^T X`` with ``b`` sequences per call,
    so that ``H = 2/N * sum x x^T`` over all tokens of the N sequences seen (fp32 ``[d, d]``)."""

    def __init__(self, dim: int) -> None:
        self.H = torch.zeros(dim, dim, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        """``x``: float32 ``[b, T, d]`` (b sequences); ``weights``: optional per-token weights
        ``[b, T]`` (``H += 2/N * sum_t w_t x_t x_t^T``), normalised to mean 1 per sequence so
        that the Hessian keeps the plain one's scale."""
        b = x.shape[0]
        if weights is not None:
            w = weights / weights.mean(-1, keepdim=True).clamp_min(1e-30)
            x = x * w.sqrt()[..., None]
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        total = self.n + b
        self.H.addmm_(flat.t(), flat, beta=self.n / total, alpha=2.0 / total)
        self.n = total


def _batches(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _install(layer: Any, name: str, W: torch.Tensor, new: Any) -> None:
    """Check ``quantize_fn``'s result and make it the layer's weight."""
    if isinstance(new, np.ndarray):
        new = torch.from_numpy(np.ascontiguousarray(new))
    if not isinstance(new, torch.Tensor):
        raise InputError(f"{name}: quantize_fn expected to return a tensor (not "
                         f"{type(new).__name__})")
    if tuple(new.shape) != tuple(W.shape):
        raise InputError(f"{name}: quantize_fn returned shape {list(new.shape)} "
                         f"(expected {list(W.shape)})")
    new = new.detach().to(torch.float32).contiguous()
    if not torch.isfinite(new).all():
        raise NumericsError(f"{name}: quantize_fn returned NaN/inf weights")
    layer.linear(name).weight = torch.nn.Parameter(new.clone(), requires_grad=False)


@dataclass
class _Stats:
    """Seconds spent in layer forwards, Hessian updates and quantize_fn."""

    forward: float = 0.0
    hessian: float = 0.0
    quantize: float = 0.0


def _quantize_group(layer: Any, names: list[str], acc: HessianAccumulator,
                    quantize_fn: QuantizeFn, stats: _Stats,
                    special: dict[str, HessianAccumulator] | None = None,
                    target: Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor] | None
                    = None) -> None:
    """Quantize ``names`` with ``acc``'s Hessian (or ``special[name]``'s where given);
    ``target(name, W, H)``: the weight ``quantize_fn`` approximates instead of ``W``."""
    t0 = time.perf_counter()
    for name in names:
        H = (special or {}).get(name, acc).H
        if not torch.isfinite(H).all():
            raise NumericsError(f"{name}: Hessian has NaN/inf values (the layer's input "
                                "activations overflowed in float32)")
        W = layer.linear(name).weight.detach().clone()
        if target is not None:
            W = target(name, W, H)
        _install(layer, name, W, quantize_fn(name, W, H.clone()))
    stats.quantize += time.perf_counter() - t0


def _accumulate(h: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], dim: int,
                bs: int, stats: _Stats, keep: bool) -> tuple[HessianAccumulator, list]:
    acc, kept = HessianAccumulator(dim), []
    for sl in _batches(h.shape[0], bs):
        t0 = time.perf_counter()
        x = fn(h[sl])
        t1 = time.perf_counter()
        acc.add(x)
        stats.forward += t1 - t0
        stats.hessian += time.perf_counter() - t1
        if keep:
            kept.append(x)
    return acc, kept


def _input_then_apply(layer: Any, h: torch.Tensor, inp: Callable, apply: Callable, dim: int,
                      names: list[str], quantize_fn: QuantizeFn, bs: int, cache_bytes: int,
                      stats: _Stats) -> None:
    """Hessian of ``inp(h)``, quantize ``names``, then ``h <- apply(h, inp(h))`` with the new
    weights (``inp(h)`` kept from the first pass if it fits in ``cache_bytes``)."""
    keep = h.shape[0] * h.shape[1] * dim * 4 <= cache_bytes
    acc, kept = _accumulate(h, inp, dim, bs, stats, keep)
    _quantize_group(layer, names, acc, quantize_fn, stats)
    t0 = time.perf_counter()
    for k, sl in enumerate(_batches(h.shape[0], bs)):
        x = kept[k] if keep else inp(h[sl])
        h[sl] = apply(h[sl], x)
    kept.clear()
    stats.forward += time.perf_counter() - t0


def _accumulate_qkv(layer: Any, h: torch.Tensor, rope: Any, bs: int, stats: _Stats,
                    v_hessian: str) -> tuple[HessianAccumulator, HessianAccumulator | None]:
    """q/k/v's plain Hessian and, for ``v_hessian="attention"``, v_proj's attention-weighted
    one ``2/N sum_t w_t x_t x_t^T`` (``w_t``: the squared attention token ``t`` receives,
    ``_Attention.received_attention``), both from one pass computing each input ``x`` once."""
    dim = layer.arch.hidden
    acc = HessianAccumulator(dim)
    acc_v = HessianAccumulator(dim) if v_hessian == "attention" else None
    for sl in _batches(h.shape[0], bs):
        t0 = time.perf_counter()
        x = layer.attn_input(h[sl])
        w = layer.self_attn.received_attention(x, rope) if acc_v is not None else None
        t1 = time.perf_counter()
        acc.add(x)
        if acc_v is not None:
            acc_v.add(x, w)
        stats.forward += t1 - t0
        stats.hessian += time.perf_counter() - t1
    return acc, acc_v


def _run_layer(layer: Any, h: torch.Tensor, i: int, rope: Any, quantize_fn: QuantizeFn,
               bs: int, cache_bytes: int, stats: _Stats, v_hessian: str = "plain") -> None:
    """Quantize layer ``i`` group by group and overwrite ``h`` with its (quantized) output."""
    a = layer.arch
    qkv, o, gate_up, down = ([f"{layer_prefix(i)}{m}.weight" for m in g] for g in LINEAR_GROUPS)
    acc, acc_v = _accumulate_qkv(layer, h, rope, bs, stats, v_hessian)
    special = {n: acc_v for n in qkv if ".v_proj." in n} if acc_v is not None else None
    _quantize_group(layer, qkv, acc, quantize_fn, stats, special)
    _input_then_apply(layer, h, lambda x: layer.attn_context(x, rope), layer.attn_residual,
                      a.n_heads * a.head_dim, o, quantize_fn, bs, cache_bytes, stats)
    acc, _ = _accumulate(h, layer.mlp_input, a.hidden, bs, stats, keep=False)
    _quantize_group(layer, gate_up, acc, quantize_fn, stats)
    _input_then_apply(layer, h, layer.mlp_hidden, layer.mlp_residual, a.intermediate, down,
                      quantize_fn, bs, cache_bytes, stats)


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere). Without
    it, glibc's dynamic mmap threshold lets each layer's freed temporaries fragment the heap
    around the long-lived QTensors, and peak RSS grows ~20 MiB per layer at width 576
    (tools/bench_memory.py) instead of the IR's own ~4 MiB."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Activations:
    """The residual stream ``h`` float32 ``[N, T, hidden]``: in RAM, or (``offload``) in an
    unlinked temporary file in ``$TMPDIR`` mapped into memory, whose pages are handed back to
    the kernel after every layer (:meth:`release`), so they count against the page cache, not
    the process (the kernel writes them back to the file under memory pressure)."""

    def __init__(self, shape: tuple[int, int, int], offload: bool) -> None:
        self.mm: mmap.mmap | None = None
        if not offload:
            self.h = torch.empty(shape, dtype=torch.float32)
            return
        nbytes = int(np.prod(shape)) * 4
        f = tempfile.TemporaryFile(prefix="qexport-activations-")
        try:
            f.truncate(nbytes)
            self.mm = mmap.mmap(f.fileno(), nbytes)          # shared, read-write
        except OSError as e:
            raise InputError(f"--offload-activations: could not create a {_gib(shape):.2f} GiB "
                             f"activation file in {tempfile.gettempdir()} ({e.strerror}); set "
                             "TMPDIR to a disk with room") from e
        finally:
            f.close()                                  # the mapping keeps the data
        self.h = torch.frombuffer(self.mm, dtype=torch.float32).view(shape)

    def release(self) -> None:
        if self.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.mm.madvise(mmap.MADV_DONTNEED)  # shared file mapping: the data stays in the file


def _gib(shape: tuple[int, ...]) -> float:
    return float(np.prod(shape)) * 4 / 2**30


def _initial_hidden(model: Any, samples: torch.Tensor, start_layer: int,
                    hidden: torch.Tensor | None, offload: bool = False,
                    bs: int = 8) -> _Activations:
    """Embeddings of ``samples`` (fresh run) or the saved ``hidden`` (resume), float32
    ``[N, T, hidden]``."""
    a = model.arch
    want = (int(samples.shape[0]), int(samples.shape[1]), int(a.hidden))
    if start_layer == 0 and hidden is None:
        act = _Activations(want, offload)
        emb = torch.from_numpy(model.get("model.embed_tokens.weight"))
        for sl in _batches(want[0], bs):
            act.h[sl] = torch.nn.functional.embedding(samples[sl].long(), emb)
        return act
    if not 0 <= start_layer <= a.n_layers or hidden is None \
            or tuple(hidden.shape) != want or hidden.dtype != torch.float32:
        got = None if hidden is None else f"{hidden.dtype} {list(hidden.shape)}"
        raise InputError(f"resume at layer {start_layer}: expected saved hidden states float32 "
                         f"{list(want)} and a layer in [0, {a.n_layers}] (not {got})")
    act = _Activations(want, offload)
    act.h.copy_(hidden)
    return act


def quantize_layerwise(model: Any, samples: torch.Tensor, quantize_fn: QuantizeFn, *,
                       progress: bool = True, on_layer_done: Callable[[int], None] | None = None,
                       batch_size: int = 8, threads: int | None = 2,
                       cache_bytes: int = 1 << 30, start_layer: int = 0,
                       hidden: torch.Tensor | None = None,
                       on_layer_state: Callable[[int, torch.Tensor], None] | None = None,
                       v_hessian: str = "plain", offload: bool = False,
                       asym_damp: float | None = None) -> dict[str, Any]:
    """Run GPTQ-style sequential calibration over ``model`` (a SourceModel).

    Args:
        samples: int64 ``[N, T]`` token windows (from :func:`load_calibration`).
        quantize_fn: ``(name, W [out, in] fp32, H [in, in] fp32) -> W_hat`` (dequantized weight,
            same shape; torch or numpy). Called in true-sequential order; each call gets its own
            copies of W and H, so it may modify them in place.
        on_layer_done: called with the layer index after each layer (checkpointing).
        batch_size: sequences per forward / Hessian update.
        threads: torch intra-op threads during the run (restored afterwards); None leaves it.
        cache_bytes: largest group input kept in memory instead of being recomputed.
        start_layer, hidden: resume (qexport.checkpoint): skip layers ``< start_layer`` and start
            from ``hidden``, float32 ``[N, T, hidden]``, the residual stream entering
            ``start_layer`` as saved by an earlier run (required when ``start_layer > 0``).
        on_layer_state: called with ``(i, h)`` after layer ``i``; ``h`` is the residual stream
            entering layer ``i + 1`` (not to be modified).
        v_hessian: ``"plain"`` (GPTQ's: every token weighs the same) or ``"attention"``: v_proj
            gets a Hessian whose tokens are weighted by the squared attention they receive, so
            that its objective is the attention output's error (attention-sink tokens dominate
            it); q/k/o/gate/up/down keep the plain Hessian. See docs/gptq-value-hessian.md.
        offload: keep the residual stream in a temporary file (``$TMPDIR``) instead of RAM and
            recompute group inputs instead of caching them (``cache_bytes`` 0): peak memory is
            one batch's activations, not ``N x T x hidden`` floats. Same results bit for bit.
        asym_damp: None, or asymmetric calibration (:mod:`qexport.calib_asym`): a second,
            full-precision stream runs beside the quantized one, and each linear's codes
            approximate the weight that maps its quantized-model input to the full-precision
            layer's output (``asym_damp``: the dampening of that least-squares solve).

    Returns:
        ``{"layers", "n_samples", "seq_len", "seconds", "seconds_forward", "seconds_hessian",
        "seconds_quantize"}``.
    """
    from tqdm import tqdm

    from qexport.model.forward import DecoderLayer, Rotary
    a = model.arch
    if samples.dim() != 2 or samples.dtype not in (torch.int64, torch.int32):
        raise InputError(f"calibration samples expected int64 [N, T] (not {samples.dtype} "
                         f"{list(samples.shape)})")
    if v_hessian not in V_HESSIANS:
        raise InputError(f"v_hessian: expected one of {list(V_HESSIANS)} (not {v_hessian!r})")
    if int(samples.min()) < 0 or int(samples.max()) >= a.vocab:
        raise InputError(f"calibration samples expected token ids in [0, {a.vocab}) "
                         f"(found {int(samples.min())}..{int(samples.max())})")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    stats, t_start = _Stats(), time.perf_counter()
    try:
        with torch.no_grad():
            act = _initial_hidden(model, samples, start_layer, hidden, offload, batch_size)
            h = act.h
            if offload:
                cache_bytes = 0
            rope = Rotary(a)(samples.shape[1])
            fp = None
            if asym_damp is not None:
                from qexport.calib_asym import FPStream
                fp = FPStream(model, samples, start_layer, rope, batch_size, offload, asym_damp,
                              cache_bytes)
            for i in tqdm(range(start_layer, a.n_layers), desc="calibrate", unit="layer",
                          disable=not progress, initial=start_layer, total=a.n_layers):
                layer = DecoderLayer(model.layer_weights(i), a, i)
                if fp is not None:
                    fp.run_layer(layer, h, i, quantize_fn, stats, v_hessian)
                else:
                    _run_layer(layer, h, i, rope, quantize_fn, batch_size, cache_bytes, stats,
                               v_hessian)
                del layer
                _trim_heap()
                if on_layer_state is not None:
                    on_layer_state(i, h)
                act.release()
                if fp is not None:
                    fp.act.release()
                if on_layer_done is not None:
                    on_layer_done(i)
    finally:
        torch.set_num_threads(old_threads)
    return {"layers": a.n_layers, "n_samples": int(samples.shape[0]),
            "seq_len": int(samples.shape[1]), "seconds": round(time.perf_counter() - t_start, 2),
            "seconds_forward": round(stats.forward, 2), "seconds_hessian": round(stats.hessian, 2),
            "seconds_quantize": round(stats.quantize, 2)}
