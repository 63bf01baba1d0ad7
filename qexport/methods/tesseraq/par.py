"""Progressive adaptive rounding (PAR) with dequantization scale tuning (DST) for one linear.

Per weight ``w`` between the two candidate values ``v0`` (code ``c0``) and ``v1`` (``c0 + 1``)
of a fixed grid (see :mod:`.levels`), the fake-quantized weight is

    soft:  f * (v0 + h(r) * (v1 - v0)),   h(r) = clamp(sigmoid(r) * (zeta - gamma) + gamma, 0, 1)
    hard:  f * (v1 if up else v0)
    f = 2 * sigmoid(v)   per (row, group), v = 0 at start (DST; off: f = 1)

with zeta = 1.1, gamma = -0.1 (AdaRound's rectified sigmoid) and ``r`` initialised to
``h^-1(frac)``. Hard/soft state is a boolean mask (``soft``) plus the boolean decision ``up``,
never +-inf in ``r``. Hardening at threshold ``tau``: score ``|h(r) - 0.5|`` (0.5 for variables
already hard), ``c = quantile(score, tau)`` over *all* variables of the tensor (TesseraQ's global
fraction), and every soft variable with score > c becomes hard with ``up = h(r) > 0.5``.
Export: codes are ``c0 + up`` (never re-rounded floats) and the grid is ``dst_grid(grid, f)``.
"""
from __future__ import annotations

import numpy as np
import torch

from qexport.errors import InputError
from qexport.grids import Grid, GridSpec
from qexport.methods.result import QuantResult

from .levels import dst_grid, fit_grid, group_index, neighbors

__all__ = ["ZETA", "GAMMA", "rect_sigmoid", "rect_sigmoid_inv", "RoundingVars"]

ZETA, GAMMA = 1.1, -0.1


def rect_sigmoid(r: torch.Tensor) -> torch.Tensor:
    """AdaRound's rectified sigmoid ``clamp(sigmoid(r) * (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(r) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rect_sigmoid_inv(p: torch.Tensor) -> torch.Tensor:
    """``r`` with ``rect_sigmoid(r) == p`` for ``p`` in [0, 1] (finite: p maps into
    [1/12, 11/12] before the logit)."""
    q = (p.clamp(0.0, 1.0) - GAMMA) / (ZETA - GAMMA)
    return torch.log(q) - torch.log1p(-q)


class RoundingVars(torch.nn.Module):
    """TesseraQ state of one ``[out, in]`` weight on a fixed grid.

    Attributes:
        r: float32 ``[out, in]`` rounding logits (trained while ``soft``).
        v: float32 ``[out, n_groups]`` DST logits (trained when ``dst``).
        soft: bool ``[out, in]`` (buffer); up: bool ``[out, in]`` hard decisions (buffer).
    """

    def __init__(self, name: str, W: np.ndarray, spec: GridSpec, *, dst: bool = True,
                 grid: Grid | None = None) -> None:
        super().__init__()
        self.name, self.spec, self.dst = name, spec, dst
        W = np.asarray(W, dtype=np.float32)
        self.grid = grid if grid is not None else fit_grid(spec, W, name)
        nb = neighbors(spec, self.grid, W)
        self.c0 = nb.c0
        self._init_up = nb.frac > 0.5
        self.register_buffer("v0", torch.from_numpy(nb.v0))
        self.register_buffer("v1", torch.from_numpy(nb.v1))
        self.register_buffer("step", self.v1 - self.v0)
        frac = torch.from_numpy(nb.frac)
        self.r = torch.nn.Parameter(rect_sigmoid_inv(frac))
        ng = spec.n_groups(W.shape[1])
        self.v = torch.nn.Parameter(torch.zeros(W.shape[0], ng), requires_grad=dst)
        self.register_buffer("gidx", torch.from_numpy(group_index(spec, W.shape[1])))
        self.register_buffer("soft", torch.ones(W.shape, dtype=torch.bool))
        self.register_buffer("up", frac > 0.5)
        self._round: tuple | None = None

    # ---- forward ----------------------------------------------------------------------
    def dst_factor(self) -> torch.Tensor:
        """``2 sigmoid(v)``, float32 ``[out, n_groups]`` (exactly 1 at v = 0)."""
        return 2.0 * torch.sigmoid(self.v)

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight, float32 ``[out, in]`` (differentiable in r and v; inside a
        round only the round's compact soft variables carry gradients)."""
        if self._round is not None:
            idx, base, v0s, steps, r_soft = self._round
            w = base.index_put((idx,), v0s + rect_sigmoid(r_soft) * steps).view(self.v0.shape)
        else:
            hard = torch.where(self.up, self.v1, self.v0)
            w = torch.where(self.soft, self.v0 + rect_sigmoid(self.r) * self.step, hard)
        return self._dst(w) if self.dst else w

    def _dst(self, w: torch.Tensor) -> torch.Tensor:
        """``w * f`` with ``f`` per (row, group) broadcast over the group's columns."""
        out_f, in_f = w.shape
        gl = self.spec.group_len(in_f)
        f = self.dst_factor()
        if in_f % gl == 0:
            return (w.view(out_f, in_f // gl, gl) * f[..., None]).view(out_f, in_f)
        return w * f[:, self.gidx]

    # ---- rounds --------------------------------------------------------------------------
    def begin_round(self) -> torch.nn.Parameter:
        """Gather the still-soft variables into a fresh compact parameter (what Adam trains
        this round); the hard part of the weight is fixed for the round."""
        with torch.no_grad():
            idx = torch.nonzero(self.soft.flatten()).flatten()
            base = torch.where(self.up, self.v1, self.v0).flatten()
            r_soft = torch.nn.Parameter(self.r.detach().flatten()[idx].clone())
            self._round = (idx, base, self.v0.flatten()[idx], self.step.flatten()[idx], r_soft)
        return r_soft

    def end_round(self) -> None:
        """Write the round's trained soft variables back into ``r``."""
        if self._round is not None:
            idx, r_soft = self._round[0], self._round[4]
            with torch.no_grad():
                self.r.view(-1)[idx] = r_soft.detach()
            self._round = None

    @torch.no_grad()
    def hard_weight(self) -> torch.Tensor:
        """float32 ``[out, in]``: every variable at its current ``up`` decision, no DST (before
        training: round-to-nearest on the grid, bit for bit RTN's dequantized weight)."""
        return torch.where(self.up, self.v1, self.v0)

    # ---- hardening ---------------------------------------------------------------------
    @torch.no_grad()
    def harden(self, tau: float) -> int:
        """Harden every soft variable whose score exceeds the ``tau`` quantile of all scores.

        Returns the number of variables hardened now."""
        h = rect_sigmoid(self.r)
        score = torch.where(self.soft, (h - 0.5).abs(), torch.full_like(h, 0.5)).flatten()
        k = min(max(int(round(tau * score.numel())), 1), score.numel())
        c = torch.kthvalue(score, k).values
        new = self.soft & ((h - 0.5).abs() > c)
        self.up[new] = h[new] > 0.5
        self.soft &= ~new
        return int(new.sum())

    @torch.no_grad()
    def harden_all(self) -> None:
        """Make every variable hard: ``up = r > 0`` (i.e. h(r) > 0.5) where still soft."""
        self.up[self.soft] = self.r[self.soft] > 0
        self.soft.zero_()

    @property
    def soft_fraction(self) -> float:
        return float(self.soft.float().mean())

    # ---- export ------------------------------------------------------------------------
    def codes(self) -> np.ndarray:
        """uint8 ``[out, in]``: ``c0 + up`` (every variable must be hard)."""
        if bool(self.soft.any()):
            raise InputError(f"{self.name}: codes expected every rounding variable hard "
                             f"(found {int(self.soft.sum())} soft; call harden_all first)")
        return self.c0 + self.up.numpy().astype(np.uint8)

    def export(self) -> QuantResult:
        """Codes and the DST-tuned grid snapped onto the spec (see :func:`.levels.dst_grid`)."""
        codes = self.codes()
        grid = self.grid
        if self.dst:
            grid = dst_grid(self.spec, self.grid, self.dst_factor().detach().numpy())
        stats = {"method": "tesseraq", "dst": self.dst,
                 "up_flips": int((codes != self._nearest_codes()).sum())}
        if self.dst:
            f = self.dst_factor().detach()
            stats.update({"dst_min": float(f.min()), "dst_max": float(f.max())})
        return QuantResult(codes=codes, grid=grid, spec=self.spec, stats=stats)

    def _nearest_codes(self) -> np.ndarray:
        """Round-to-nearest codes on the initial grid (what RTN would store)."""
        return self.c0 + self._init_up.astype(np.uint8)
