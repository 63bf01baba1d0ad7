"""Small helpers around :class:`qexport.model.forward.DecoderLayer` for block-wise methods.

Weights of one decoder layer are handled as a dict of float32 torch tensors keyed by the
HF-relative name (``self_attn.q_proj.weight``, ``input_layernorm.weight``, ...).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from qexport.model.arch import layer_prefix

__all__ = ["relative_weights", "full_name", "swapped", "batched", "block_loss", "block_output",
           "torch_threads", "train_step"]


def relative_weights(weights: Mapping[str, np.ndarray], layer_idx: int) -> dict[str, torch.Tensor]:
    """``{HF-relative name: float32 tensor}`` copies of layer ``layer_idx``'s tensors."""
    p = layer_prefix(layer_idx)
    return {k[len(p):] if k.startswith(p) else k:
            torch.from_numpy(np.array(v, dtype=np.float32, copy=True)) for k, v in weights.items()}


def full_name(layer_idx: int, rel: str) -> str:
    return f"{layer_prefix(layer_idx)}{rel}"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the body with ``n`` torch threads (None / 0: unchanged), then restore."""
    outer = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(outer)


@contextlib.contextmanager
def swapped(layer: torch.nn.Module, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily replace parameters of ``layer`` (relative names) by ``params`` (no grad)."""
    old: dict[str, torch.nn.Parameter] = {}
    try:
        for name, t in params.items():
            mod_name, _, attr = name.rpartition(".")
            mod = layer.get_submodule(mod_name)
            old[name] = getattr(mod, attr)
            setattr(mod, attr, torch.nn.Parameter(t.detach(), requires_grad=False))
        yield
    finally:
        for name, p in old.items():
            mod_name, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(mod_name), attr, p)


def batched(fn: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, bs: int,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` over ``h [N, T, d]`` in batches of ``bs`` sequences without grad; ``out`` may be
    ``h`` itself (in-place update)."""
    with torch.no_grad():
        for s in range(0, h.shape[0], bs):
            y = fn(h[s:s + bs])
            if out is None:
                out = torch.empty((h.shape[0],) + tuple(y.shape[1:]), dtype=y.dtype)
            out[s:s + bs] = y
    return out


def block_loss(y_ref: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """TesseraQ's l2 loss: sum over the hidden axis, mean over sequences and tokens."""
    return (y_ref - y).pow(2).sum(-1).mean()


def block_output(layer: torch.nn.Module, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                 bs: int) -> torch.Tensor:
    """``layer(h)`` for ``h [N, T, d]`` in batches (no grad), a new tensor."""
    return batched(lambda x: layer(x, rope), h, bs)


def train_step(layer: torch.nn.Module, weights: Callable[[], Mapping[str, torch.Tensor]],
               h_in: torch.Tensor, y_ref: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
               opt: torch.optim.Optimizer, gen: torch.Generator, batch_size: int,
               what: str) -> float:
    """One Adam step of :func:`block_loss` on ``batch_size`` random sequences of ``h_in`` /
    ``y_ref`` (float32 ``[n, T, d]``) cut to ``rope``'s length; ``weights()`` gives the
    block's linear weights (relative names) from the trained parameters. Returns the loss.

    Raises:
        NumericsError: the loss is not finite (``what`` names the loop and the block).
    """
    from qexport.errors import NumericsError
    n, T = h_in.shape[0], rope[0].shape[0]
    idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
    loss = block_loss(y_ref[idx, :T],
                      torch.func.functional_call(layer, dict(weights()), (h_in[idx, :T], rope)))
    if not torch.isfinite(loss):
        raise NumericsError(f"{what}: loss became {float(loss)} (expected finite; check the "
                            "calibration activations)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())
