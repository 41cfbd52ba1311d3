"""The kernels' shared helpers: masking by adding a 0 / -inf matrix equals masked_fill."""

from __future__ import annotations

import pytest
import torch

from poslab.kernels.bias import _hide_future
from poslab.kernels.common import hidden, hide_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hiding_by_an_add_equals_masked_fill_with_a_broadcast_mask_and_its_gradient(dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=dtype) * 50
    keep = torch.rand(5, 7) > 0.4
    keep[:, 0] = True  # every row keeps a key, so the softmax below is defined
    want = x.masked_fill(~keep, float("-inf"))
    assert torch.equal(hide_(x.clone(), keep), want)
    assert torch.equal(x + hidden(keep, dtype), want)
    assert hidden(keep, dtype).dtype == dtype
    # Through a softmax the hidden entries get no gradient, as with masked_fill.
    probe = torch.randn(x.shape, dtype=dtype)
    grads = []
    for mask in (lambda t: t.masked_fill(~keep, float("-inf")), lambda t: t + hidden(keep, dtype)):
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
