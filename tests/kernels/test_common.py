"""The kernels' shared helpers: masking by adding a 0 / -inf matrix equals masked_fill, and the
exponentials that keep off torch's slow path for underflowing arguments equal exp and softmax."""

from __future__ import annotations

import math

import pytest
import torch

from poslab.kernels.bias import _hide_future
from poslab.kernels.common import exp_normal_, hidden_mask, hide_, row_softmax_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hiding_by_an_add_equals_masked_fill_with_a_broadcast_mask_and_its_gradient(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=dtype) * 50
    keep = torch.rand(5, 7) > 0.4
    keep[:, 0] = True  # every row keeps a key, so the softmax below is defined
    want = x.masked_fill(~keep, float("-inf"))
    assert torch.equal(hide_(x.clone(), keep), want)
    assert torch.equal(x + hidden_mask(keep, dtype), want)
    assert hidden_mask(keep, dtype).dtype == dtype
    # Through a softmax the hidden entries get no gradient, as with masked_fill.
    probe = torch.randn(x.shape, dtype=dtype)
    grads = []
    for mask in (lambda t: t.masked_fill(~keep, float("-inf")), lambda t: t + hidden_mask(keep, dtype)):
        leaf = x.clone().requires_grad_()
        (torch.softmax(mask(leaf), -1) * probe).sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    assert (grads[1][..., ~keep] == 0).all()


@pytest.mark.parametrize(("first", "n_rows", "end"), [(0, 4, 4), (3, 4, 7), (5, 3, 12), (2, 1, 3), (6, 2, 7)])
def test_hide_future_hides_exactly_the_keys_after_each_query(first, n_rows, end):
    logits = torch.randn(2, 3, n_rows, end)
    want = logits.clone()
    for r in range(n_rows):
        want[..., r, first + r + 1 :] = float("-inf")  # query first + r sees keys 0..first + r
    _hide_future(logits, first, end)
    assert torch.equal(logits, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_normal_is_exp_with_what_would_underflow_set_to_zero(dtype):
    tiny = torch.finfo(dtype).tiny
    floor = math.log(tiny) + 2.0
    x = torch.cat(
        (torch.linspace(floor - 40, 5, 997, dtype=dtype), torch.tensor([float("-inf")] * 3, dtype=dtype))
    )
    got = exp_normal_(x.clone())
    want = torch.exp(x)
    small = want <= tiny * math.exp(2.0) * (1 + 1e-3)
    assert small.any() and (~small).any()
    assert (got[small] == 0).all()
    torch.testing.assert_close(got[~small], want[~small], rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_softmax_with_lse_equals_softmax_on_sharp_and_masked_rows(dtype):
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 6, 40, dtype=dtype) * 60  # sharp: most entries underflow
    keep = torch.rand(6, 40) > 0.3
    keep[:, 0] = True
    logits = logits.masked_fill(~keep, float("-inf"))
    probs, lse = row_softmax_(logits.clone(), need_lse=True)
    torch.testing.assert_close(probs, torch.softmax(logits, -1), rtol=1e-6, atol=torch.finfo(dtype).tiny * 10)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1, keepdim=True))
    assert (probs[..., ~keep] == 0).all()
    # The backward's recomputation: exp_normal_(logits - lse) gives the same probabilities.
    assert torch.equal(exp_normal_(logits.clone().sub_(lse)) > 0, probs > 0)
    torch.testing.assert_close(exp_normal_(logits.clone().sub_(lse)), probs, rtol=1e-5, atol=0)
