"""DAPE: data-adaptive positional encoding (Zheng et al., NeurIPS 2024, arXiv 2405.14722, eq. 4),
and DAPE V2 (arXiv 2410.04798), which replaces the pointwise MLP by a 1 x k convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from poslab.encodings.base import (
    PositionEncoding,
    accepts_option,
    build_encoding,
    causal_mask,
    check_positive,
    parse_spec,
    register,
)
from poslab.kernels.dape import dape_attention, uses_native

# How causal V2 keeps the future out: 'hidden' zeroes [A; B] and the hidden map above the diagonal
# (poslab's default), 'input' zeroes [A; B] only (the official code).
V2_MASKS = ("hidden", "input")

# Which terms the final logits hold: A the raw logits, B the base bias, f the learned mixer.
FORMS = {
    "A+B+f(A,B)": (True, True),  # DAPE (the paper's final form)
    "A+f(A,B)": (False, True),
    "A+f(B)": (False, False),
    "A+B": (True, None),  # the base alone
}


@register("dape")
class DAPE(PositionEncoding):
    """logits = A + B + f([A; B]), f mixing the 2H logit and bias channels at every (i, j).

    f = Linear(2H, D) -> LeakyReLU(0.01) -> Linear(D, H), pointwise (``kernel_size=1``, the NeurIPS
    paper), or Conv2d(2H, D, (1, k)) -> LeakyReLU -> Conv2d(D, H, (1, k)) sliding along the keys of
    each query row (``kernel_size=k > 1``, V2). For causal V2 the future entries (j > i) of [A; B]
    and, by default, of the hidden map are zeroed: otherwise future logits leak into the past, and a
    row's output would depend on how many future keys exist (cached decoding must equal the full
    forward).

    The official V2 code zeroes [A; B] only (``v2_mask='input'``). Its hidden map is then nonzero just
    past the diagonal (j = i+1..i+k//2, from the taps that still reach j <= i, and the bias), and the
    second convolution reads it into the band j = i-k//2..i. So a row depends on whether the sequence
    goes on after it: the full forward's last k//2 rows see zero padding there, the others do not.
    That form reproduces weights trained with the official code; poslab gives query blocks k//2
    extra keys for it (``key_lookahead``) so blocks equal the full forward, but cached decoding cannot
    (the keys after the query do not exist yet) and the model refuses it.

    Options:
        base: the encoding providing B (any bias and/or rotation encoding, e.g. 'alibi', 'kerple_log',
            'fire', 't5', 'rope'), or None/'nope' for B = 0 (NoPE + DAPE is A + f(A)).
        base_options: options passed to the base. A FIRE base defaults to ``activation='leaky_relu'``,
            as in the official DAPE-FIRE.
        width: D, the hidden width (32 by default; the paper sweeps 4 to 64).
        kernel_size: 1 (the MLP) or an odd k > 1 (V2).
        form: 'A+B+f(A,B)' (DAPE), or the ablations 'A+f(A,B)', 'A+f(B)', 'A+B'.
        v2_mask: causal V2 only: 'hidden' (zero [A; B] and the hidden map above the diagonal) or
            'input' (zero [A; B] only, as the official code does).
        train_len: the training length, passed on to a base that takes it (FIRE's threshold).

    Attributes:
        mlp: the mixer f, a Sequential whose last entry is the output layer (None for 'A+B').
        base: the base encoding module, or None.
    """

    hooks = frozenset({"logits"})

    def __init__(
        self,
        *,
        n_heads: int,
        head_dim: int,
        base: str | None = "alibi",
        base_options: dict[str, Any] | None = None,
        width: int = 32,
        kernel_size: int = 1,
        form: str = "A+B+f(A,B)",
        v2_mask: str = "hidden",
        train_len: int | None = None,
        causal: bool | None = None,
    ) -> None:
        super().__init__(n_heads=n_heads, head_dim=head_dim)
        self.causal = causal  # passed to the base (see `build_encoding`)
        check_positive(width=width, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"dape kernel_size must be odd (1 = MLP, 3 = V2), got {kernel_size}")
        if form not in FORMS:
            raise ValueError(f"unknown dape form {form!r}; choose one of {', '.join(FORMS)}")
        if v2_mask not in V2_MASKS:
            raise ValueError(f"unknown dape v2_mask {v2_mask!r}; choose one of {', '.join(V2_MASKS)}")
        if v2_mask != "hidden" and kernel_size == 1:
            raise ValueError(f"dape v2_mask={v2_mask!r} applies to V2 only (kernel_size > 1)")
        self.base: PositionEncoding | None = None
        if base not in (None, "none", "nope"):
            base_name, spec = parse_spec(base)
            defaults = {"activation": "leaky_relu"} if base_name == "fire" else {}
            if train_len is not None and accepts_option(base_name, "train_len"):
                defaults["train_len"] = train_len
            options = {**{k: v for k, v in defaults.items() if k not in spec}, **(base_options or {})}
            self.base = build_encoding(base, n_heads=n_heads, head_dim=head_dim, causal=causal, **options)
            if self.base.uses_logits:
                raise ValueError(
                    f"dape base {base!r} rewrites logits itself; use a bias or rotation encoding"
                )
        elif base_options:
            raise ValueError("dape: base_options given without a base")
        self.hooks = frozenset({"logits"} | (self.base.hooks if self.base is not None else set()))
        self.supports_causal = self.base is None or self.base.supports_causal
        self.supports_bidirectional = self.base is None or self.base.supports_bidirectional
        self.form, self.width, self.kernel_size, self.v2_mask = form, width, kernel_size, v2_mask
        # The official mask reads hidden entries up to k//2 keys after the query.
        self.key_lookahead = kernel_size // 2 if v2_mask == "input" else 0
        self.add_base, self.reads_logits = FORMS[form]

        self.mlp: nn.Sequential | None = None
        if self.reads_logits is not None:
            c_in = 2 * n_heads if self.reads_logits else n_heads
            if kernel_size == 1:
                self.mlp = nn.Sequential(
                    nn.Linear(c_in, width), nn.LeakyReLU(0.01), nn.Linear(width, n_heads)
                )
            else:
                pad = (0, kernel_size // 2)
                self.mlp = nn.Sequential(
                    nn.Conv2d(c_in, width, (1, kernel_size), padding=pad),
                    nn.LeakyReLU(0.01),
                    nn.Conv2d(width, n_heads, (1, kernel_size), padding=pad),
                )

    # The base's position hooks pass straight through.
    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x if self.base is None else self.base.embed(x, positions)

    def rotate(self, q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor) -> tuple[Tensor, Tensor]:
        return (q, k) if self.base is None else self.base.rotate(q, k, q_pos, k_pos)

    def bias(self, q_pos: Tensor, k_pos: Tensor, *, causal: bool) -> Tensor | None:
        return None if self.base is None else self.base.bias(q_pos, k_pos, causal=causal)

    def relative_bias(self, offsets: Tensor, *, causal: bool) -> Tensor | None:
        return None if self.base is None else self.base.relative_bias(offsets, causal=causal)

    def fast_bias(
        self, q_pos: Tensor, k_pos: Tensor, *, causal: bool, first: int | None = None
    ) -> Tensor | None:
        return None if self.base is None else self.base.fast_bias(q_pos, k_pos, causal=causal, first=first)

    def check_length(self, max_position: int) -> None:
        if self.base is not None:
            self.base.check_length(max_position)

    def check_queries(self, q: Tensor) -> None:
        """ValueError for queries (B, H, T, Dh) this module cannot mix: another head count than it
        was built for, or a dtype other than its MLP's outside autocast (torch would fail later
        with an expand or dtype error that names neither)."""
        if q.shape[1] != self.n_heads:
            raise ValueError(
                f"dape was built for n_heads={self.n_heads}, got queries with {q.shape[1]} heads "
                f"(shape {tuple(q.shape)}); build it with n_heads={q.shape[1]}"
            )
        if self.mlp is None or torch.is_autocast_enabled(q.device.type):
            return
        dtype = next(self.mlp.parameters()).dtype
        if q.dtype != dtype:
            raise ValueError(
                f"dape's MLP is {dtype} but the queries are {q.dtype}; convert the encoding "
                f"(encoding.to({q.dtype})) or run under torch.autocast"
            )

    def mix(self, features: Tensor, keep: Tensor | None) -> Tensor:
        """Apply f to (B, C, T, S) channel-first features; ``keep`` (T, S) zeroes V2's future (the input
        and, unless ``v2_mask='input'``, the hidden map)."""
        assert self.mlp is not None
        if self.kernel_size == 1:
            return self.mlp(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (B, H, T, S)
        conv_in, act, conv_out = self.mlp
        if keep is None:
            return conv_out(act(conv_in(features)))
        hidden = act(conv_in(features * keep))
        return conv_out(hidden * keep if self.v2_mask == "hidden" else hidden)

    def logits(
        self,
        scores: Tensor,
        bias: Tensor | None,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        q_pos: Tensor,
        k_pos: Tensor,
        *,
        causal: bool,
    ) -> Tensor:
        self.check_queries(q)
        b = torch.zeros_like(scores) if bias is None else bias.to(scores.dtype).expand_as(scores)
        out = scores + b if self.add_base else scores
        if self.mlp is None:
            return out
        if self.reads_logits:
            features = torch.cat((scores, b), dim=1)  # (B, 2H, T, S)
        else:
            # f(B) is the same for every sequence of the batch: mix B once and broadcast the result.
            one = b[:1] if bias is None else bias.to(scores.dtype)
            features = one.reshape((1,) * (4 - one.dim()) + tuple(one.shape))  # (1 or B, H, T, S)
        keep = None
        if causal and self.kernel_size > 1:
            keep = causal_mask(q_pos, k_pos).to(scores.dtype)
        return out + self.mix(features, keep)

    def block_channels(self, q: Tensor) -> int:
        """Channels per (batch, query, key) of the largest per-block intermediate, for sizing query
        blocks: the D-channel hidden map, except in the native kernel, which never stores it (there
        the scores, logits and their gradient, 2H is a fair size)."""
        if self.mlp is None:
            return self.n_heads
        return 2 * self.n_heads if self.runs_natively(q) else max(self.n_heads, self.width)

    @property
    def has_fused_kernel(self) -> bool:
        """f over [A; B] has a fused kernel: the MLP (C++ or PyTorch) and V2 with kernel_size 3 in
        its default mask (C++ only); other kernel sizes, the official V2 mask (``v2_mask='input'``)
        and the f(B) ablations take the eager path."""
        v2_native = self.kernel_size == 3 and self.v2_mask == "hidden"
        return self.mlp is not None and (self.kernel_size == 1 or v2_native) and self.reads_logits

    def runs_natively(self, q: Tensor) -> bool:
        """Whether ``attention_block`` runs f in the C++ kernel for queries like ``q``."""
        return self.has_fused_kernel and uses_native(q, self.mlp)

    def attention_block(self, q, k, v, bias, q_pos, k_pos, keep, *, causal, save_bytes=0):
        self.check_queries(q)
        if not self.has_fused_kernel or (self.kernel_size > 1 and not self.runs_natively(q)):
            return None
        return dape_attention(q, k, v, bias, keep, self.mlp, add_base=self.add_base, save_bytes=save_bytes)

    def extra_repr(self) -> str:
        mask = f", v2_mask={self.v2_mask}" if self.kernel_size > 1 else ""
        return (
            f"{super().extra_repr()}, form={self.form}, width={self.width}, kernel_size={self.kernel_size}"
            f"{mask}"
        )
