"""Why v_proj gets an attention-weighted Hessian: per-layer attention-output error on the sample
model for RTN and for GPTQ with three v_proj Hessians.

For each chosen layer of the float model: v_proj's input ``x`` and the attention probabilities
``A`` on calibration windows (c4, 32 x 512) give three Hessians

| name        | Hessian                                                   | rows          |
|-------------|-----------------------------------------------------------|---------------|
| plain       | ``2/N sum_t x_t x_t^T`` (reference GPTQ)                   | all           |
| attention   | ``2/N sum_t w_t x_t x_t^T``, ``w_t = mean_h sum_q A[q,t]^2`` | all (qexport) |
| per-head    | ``2/N sum_q xt_q xt_q^T``, ``xt_q = sum_t A_h[q,t] x_t``      | one KV head   |

``per-head`` is the exact Hessian of the attention output's error for fixed ``A`` (one GPTQ
per KV head); ``attention`` is its single-Hessian diagonal approximation. The error reported
is the mean squared attention-output error ``|sum_t A[q,t] (W_hat - W) x_t|^2`` per query and
head on wikitext-2 test windows (8 x 512), and the plain value error ``|(W_hat - W) x_t|^2``.

    .venv/bin/python tools/bench_value_hessian.py --layers 5 20 28
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from qexport.calib import HessianAccumulator, load_calibration
from qexport.eval import load_eval_text
from qexport.methods.gptq import gptq_quantize
from qexport.methods.rtn import rtn_quantize
from qexport.model.forward import DecoderLayer, Rotary
from qexport.model.load import load_model
from qexport.specs import target_spec

SHARED = Path(os.environ.get("QEXPORT_SHARED", Path(__file__).resolve().parents[2] / "shared"))


def probs(layer: DecoderLayer, x: torch.Tensor, rope: tuple) -> torch.Tensor:
    """Attention probabilities ``[B, heads, T, T]`` (from received_attention's own math)."""
    at, a = layer.self_attn, layer.arch
    b, t, _ = x.shape
    q = at.q_proj(x).view(b, t, a.n_heads, a.head_dim).transpose(1, 2)
    k = at.k_proj(x).view(b, t, a.n_kv_heads, a.head_dim).transpose(1, 2)
    cos, sin = rope
    half = a.head_dim // 2
    rot = lambda z: torch.cat((-z[..., half:], z[..., :half]), -1)  # noqa: E731
    q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
    k = k.repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    s = q @ k.transpose(-1, -2) / a.head_dim ** 0.5
    return s.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -torch.inf).softmax(-1)


def hessians(layer: DecoderLayer, h: torch.Tensor, rope: tuple) -> dict[str, torch.Tensor]:
    a = layer.arch
    rep = a.n_heads // a.n_kv_heads
    plain, att = HessianAccumulator(a.hidden), HessianAccumulator(a.hidden)
    head = [HessianAccumulator(a.hidden) for _ in range(a.n_kv_heads)]
    for s in range(0, h.shape[0], 4):
        x = layer.attn_input(h[s:s + 4])
        P = probs(layer, x, rope)
        plain.add(x)
        att.add(x, P.square().sum(2).mean(1))
        xt = P @ x[:, None]                                        # [b, heads, T, hidden]
        for g in range(a.n_kv_heads):
            head[g].add(xt[:, g * rep:(g + 1) * rep].reshape(x.shape[0], -1, a.hidden))
    return {"plain": plain.H, "attention": att.H, **{f"head{g}": hg.H for g, hg in enumerate(head)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[5, 20, 28])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(2)
    src = load_model("sample:smollm2")
    a = src.arch
    spec = target_spec("ir", args.bits, args.group_size, True)
    calib, _ = load_calibration(SHARED / "data/exllamav2-cal/c4.utf8", src.tokenizer,
                                n_samples=32, seq_len=512)
    ev = load_eval_text(SHARED / "data/wikitext-2-raw/wiki.test.raw", src.tokenizer)
    ev_ids = torch.as_tensor(ev.ids[:8 * 512].reshape(8, 512)).clone()
    emb = torch.from_numpy(src.get("model.embed_tokens.weight"))
    hc, he = (torch.nn.functional.embedding(s, emb) for s in (calib, ev_ids))
    rope, hd, rep = Rotary(a)(512), a.head_dim, a.n_heads // a.n_kv_heads
    print(f"| layer | v_proj W{args.bits} g{args.group_size} sym | attention-output error "
          f"| value error |\n|---|---|---|---|")
    with torch.no_grad():
        for i in range(max(args.layers) + 1):
            layer = DecoderLayer(src.layer_weights(i), a, i)
            if i in args.layers:
                n = f"model.layers.{i}.self_attn.v_proj.weight"
                W = torch.from_numpy(src.get(n))
                Hs = hessians(layer, hc, rope)
                gq = lambda Wr, H: torch.from_numpy(gptq_quantize(  # noqa: E731
                    Wr.numpy(), H.clone(), spec, name=n).to_qtensor(n).dequantize())
                cands = {"RTN": torch.from_numpy(rtn_quantize(W.numpy(), spec, name=n)
                                                 .to_qtensor(n).dequantize()),
                         "GPTQ plain H": gq(W, Hs["plain"]),
                         "GPTQ attention H (qexport)": gq(W, Hs["attention"]),
                         "GPTQ exact per-head H": torch.cat([gq(W[g * hd:(g + 1) * hd], Hs[f"head{g}"])
                                                             for g in range(a.n_kv_heads)])}
                x = layer.attn_input(he)
                P = probs(layer, x, rope)
                for lab, Wq in cands.items():
                    dv = (x @ (Wq - W).T).view(*x.shape[:2], a.n_kv_heads, hd).transpose(1, 2)
                    dctx = P @ dv.repeat_interleave(rep, 1)
                    print(f"| {i} | {lab} | {dctx.square().sum(-1).mean():.4f} "
                          f"| {dv.square().sum(-1).mean():.4f} |", flush=True)
            hc, he = layer(hc, rope), layer(he, rope)


if __name__ == "__main__":
    main()
