"""The DAPE block ops (kernels/dape.py) as torch.compile sees them: schema, fake implementation,
autograd registration and AOT dispatch of each op (the numbers against a float64 reference are
tested in test_native.py and tests/test_attention.py)."""

from __future__ import annotations

import pytest
import torch

from poslab.kernels import dape, native

pytestmark = pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler on this machine")


def op_inputs(dtype, *, op: str, with_bias: bool, taps: int = 1, grad: bool = True):
    """q, k, v, bias, keep, w1, b1, w2, b2 of a block of 5 queries over 9 keys, H = 2, D = 4, as each
    op takes them: the native op's w1 has H columns without a bias, V2's weights a last axis of 3."""
    gen = torch.Generator().manual_seed(0)
    n_heads, width, t, s = 2, 4, 5, 9

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_(grad)

    q, k, v = rand(2, n_heads, t, 8), rand(2, n_heads, s, 8), rand(2, n_heads, s, 8)
    bias = rand(n_heads, t, s) if with_bias else None
    keep = torch.ones(t, s, dtype=torch.bool).tril(s - t)
    columns = n_heads if op == "dape_mlp_block" and not with_bias else 2 * n_heads
    conv = (taps,) if taps > 1 else ()
    weights = rand(width, columns, *conv), rand(width), rand(n_heads, width, *conv), rand(n_heads)
    return q, k, v, bias, keep, *weights


# (op, kernel size, bias, the form adds the bias to the logits)
CASES = [
    ("dape_block", 1, True, True),
    ("dape_block", 1, True, False),  # A + f(A, B): the bias gradient from the MLP alone
    ("dape_block", 1, False, False),
    ("dape_mlp_block", 1, True, True),
    ("dape_mlp_block", 1, True, False),
    ("dape_mlp_block", 1, False, False),
    ("dape_mlp_block", 3, True, True),  # V2
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize(
    ("op", "taps", "with_bias", "add_base"), CASES, ids=["-".join(map(str, c)) for c in CASES]
)
def test_the_block_ops_pass_opcheck(op, taps, with_bias, add_base, save, dtype):
    """Each forward op in training and in inference, and its backward op."""
    args = op_inputs(dtype, op=op, with_bias=with_bias, taps=taps)
    forward, backward = getattr(dape, op), getattr(dape, f"{op}_backward")
    torch.library.opcheck(forward, (*args, add_base, save, True))
    plain = [None if x is None else x.detach() for x in args]
    inference = (*plain[:4], None, *plain[5:])  # all keys visible
    torch.library.opcheck(forward, (*inference, add_base, save, False))
    out, saved = forward(*plain, add_base, save, True)
    assert len(saved) == ((2 if op == "dape_mlp_block" else 3) if save else 1)
    grad = torch.randn_like(out)
    torch.library.opcheck(backward, (grad, *plain, out, saved, add_base, with_bias))


def test_the_op_gradients_equal_autograd_through_the_eager_mlp():
    """Both ops' registered backwards, saving or recomputing, against autograd through the MLP
    written out in PyTorch (float64)."""
    args = op_inputs(torch.float64, op="dape_block", with_bias=True)
    q, k, v, bias, keep, w1, b1, w2, b2 = args

    def reference():
        scores = q @ k.transpose(-1, -2) / 8**0.5
        feats = torch.cat((scores, bias.expand_as(scores)), dim=1).permute(0, 2, 3, 1)
        hidden = torch.nn.functional.leaky_relu(feats @ w1.t() + b1, dape.SLOPE)
        logits = scores + bias + (hidden @ w2.t() + b2).permute(0, 3, 1, 2)
        return torch.softmax(logits.masked_fill(~keep, float("-inf")), -1) @ v

    probe = torch.randn(2, 2, 5, 8, dtype=torch.float64)
    tensors = [q, k, v, bias, w1, b1, w2, b2]
    want = torch.autograd.grad((reference() * probe).sum(), tensors)
    for op in ("dape_block", "dape_mlp_block"):
        for save in (False, True):
            out = getattr(dape, op)(*args, True, save, True)[0]
            got = torch.autograd.grad((out * probe).sum(), tensors)
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)
