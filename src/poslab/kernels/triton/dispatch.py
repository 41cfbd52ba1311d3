"""Which Triton kernel runs an encoding, and the PyTorch side of each call (the bias table, FIRE's
inputs, CoPE's z = q e^T). Imports triton only inside ``run``."""

from __future__ import annotations

import torch
from torch import Tensor

from poslab.encodings.alibi import ALiBi
from poslab.encodings.base import PositionEncoding, as_float
from poslab.encodings.cope import CoPE
from poslab.encodings.dape import DAPE
from poslab.encodings.fire import FIRE
from poslab.encodings.kerple import KerpleLog, KerplePower
from poslab.encodings.sandwich import Sandwich
from poslab.encodings.t5 import T5Bias

# Biases of the signed distance i - j alone: one row of the encoding's own bias tabulates them.
DISTANCE_BIASES = (ALiBi, KerpleLog, KerplePower, T5Bias, Sandwich)


def _parts(encoding: PositionEncoding) -> list[PositionEncoding]:
    return list(getattr(encoding, "parts", [encoding]))


def plan(encoding: PositionEncoding | None, *, causal: bool = True) -> str | None:
    """'none', 'table', 'fire', 'cope', 'dape' or None (see ``poslab.kernels.triton.plan``)."""
    if encoding is None:
        return "none"
    parts = [p for p in _parts(encoding) if p.hooks - {"rotate"}]  # rotations are applied before
    if any(p.hooks & {"embed", "input_keys"} for p in parts):
        return None
    if not parts:
        return "none"
    if all(type(p) in DISTANCE_BIASES for p in parts):
        return "table"
    if len(parts) == 1 and type(parts[0]) is FIRE:
        return "fire"
    if len(parts) == 1 and type(parts[0]) is CoPE and not (parts[0].sep_key or parts[0].val_gates):
        return "cope" if causal else None
    if len(parts) == 1 and type(parts[0]) is DAPE and _dape_supported(parts[0]):
        return "dape"
    return None


def _dape_supported(dape: DAPE) -> bool:
    """The MLP or V2 with kernel_size 3 (either mask) of a form that reads A, over no base, RoPE or a
    distance bias."""
    if dape.mlp is None or dape.kernel_size not in (1, 3) or not dape.reads_logits:
        return False
    base = [p for p in _parts(dape.base) if p.hooks - {"rotate"}] if dape.base is not None else []
    return all(type(p) in DISTANCE_BIASES for p in base)


def run(q, k, v, encoding, q_pos: Tensor, *, causal: bool, extra_keys=None) -> Tensor:
    """Attention through the kernel ``plan`` picks; ValueError when there is none."""
    kind = plan(encoding, causal=causal)
    if kind is None:
        raise ValueError(
            f'attend(impl="triton") has no kernel for encoding {encoding.name!r}: Triton kernels cover '
            "NoPE, RoPE, ALiBi, Kerple, T5, FIRE, Sandwich, CoPE (causal only, gates from q.k), DAPE (the "
            "MLP or V2 with kernel_size 3, over NoPE, RoPE or a distance bias) and their compositions "
            "with RoPE"
        )
    if kind == "cope":
        from poslab.kernels.triton.cope import cope_attention

        (cope,) = [p for p in _parts(encoding) if p.hooks - {"rotate"}]
        return cope_attention(q, k, v, q_pos, cope.pos_emb[: cope.npos_max], cope.npos_max)

    if kind == "dape":
        from poslab.kernels.triton.dape import dape_attention

        (dape,) = [p for p in _parts(encoding) if p.hooks - {"rotate"}]
        dape.check_queries(q)
        table, c_off = None, 0
        if dape.base is not None and dape.base.hooks - {"rotate"}:
            params = distance_table(dape, q_pos.to(q.device), k.shape[2], causal=causal)
            table, c_off = params.table, params.c_off
        if dape.kernel_size == 3:
            from poslab.kernels.triton.dape_v2 import dape_v2_attention

            return dape_v2_attention(q, k, v, q_pos, dape, table, c_off, causal=causal)
        return dape_attention(q, k, v, q_pos, dape, table, c_off, causal=causal)

    from poslab.kernels.triton.bias import BiasParams, bias_attention

    n_keys = k.shape[2]
    q_pos = q_pos.to(q.device)
    if kind == "none":
        params = BiasParams(0)
    elif kind == "table":
        params = distance_table(encoding, q_pos, n_keys, causal=causal)
    else:
        (fire,) = [p for p in _parts(encoding) if p.hooks - {"rotate"}]
        params = fire_params(fire, q_pos, n_keys, causal=causal)
    return bias_attention(q, k, v, q_pos, params, causal=causal)


def distance_table(encoding: PositionEncoding, q_pos: Tensor, n_keys: int, *, causal: bool):
    """tab (H, N) with bias[h, i, j] = tab[h, c - i + j], c = max(q_pos): the encoding's own bias for
    a query at c against keys 0..N-1 (N = c + 1 causal; c + 1 + the farthest key right of a query
    otherwise)."""
    from poslab.kernels.triton.bias import BiasParams

    c = int(q_pos.max())
    right = 0 if causal else max(0, n_keys - 1 - int(q_pos.min()))
    keys = torch.arange(c + 1 + right, device=q_pos.device)
    table = encoding.bias(q_pos.new_tensor([c]), keys, causal=causal)[:, 0, :]  # (H, N)
    return BiasParams(1, table=table, c_off=c)


def fire_params(fire: FIRE, q_pos: Tensor, n_keys: int, *, causal: bool):
    """FIRE's pieces, as its ``bias`` computes them: psi(d) = log1p(|c| d) for every distance d, each
    query's norms psi(max(far, L)) + eps (far: the farthest key on each side), the MLP weights."""
    from poslab.kernels.triton.bias import BiasParams

    c = fire.c.abs()
    far_right = n_keys - 1 - q_pos
    longest = max(int(q_pos.max()), 0 if causal else int(far_right.max()))
    distances = torch.arange(longest + 1, device=q_pos.device)
    psi = torch.log1p(c * as_float(distances, c))

    def norm(far: Tensor) -> Tensor:
        return torch.log1p(c * torch.maximum(as_float(far, c), fire.threshold)) + fire.eps

    first, act, second = fire.mlp
    return BiasParams(
        2,
        psi=psi,
        norm_l=norm(q_pos),
        norm_r=None if causal else norm(far_right),
        w1=first.weight.reshape(-1),
        b1=first.bias,
        w2=second.weight,
        b2=second.bias,
        leaky=isinstance(act, torch.nn.LeakyReLU),
    )
