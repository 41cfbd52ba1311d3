"""Packed batches: ``document_ids`` keep documents apart and restart their positions, for every
encoding; each document's outputs equal running it alone."""

from __future__ import annotations

import pytest
import torch

import poslab
from conftest import ALL_ENCODINGS, decoder_only, perturb_parameters, tiny_config

# Row 0 holds documents of 5 and 9 tokens, row 1 of 3, 3 and 8 (ids are arbitrary labels; a document
# is a run of equal ids, so row 1's two 3-token documents both have length 3 and are batched together).
DOCUMENTS = [[5, 9], [3, 3, 8]]


def packed_ids() -> torch.Tensor:
    rows = [torch.cat([torch.full((n,), 10 * r + i) for i, n in enumerate(lengths)]) for r, lengths in
            enumerate(DOCUMENTS)]  # fmt: skip
    return torch.stack(rows)


def documents():
    for row, lengths in enumerate(DOCUMENTS):
        start = 0
        for n in lengths:
            yield row, start, start + n
            start += n


@pytest.mark.parametrize("causal", [True, False], ids=["decoder", "encoder"])
@pytest.mark.parametrize("name", ALL_ENCODINGS)
def test_packed_documents_equal_each_document_alone(name, causal):
    if decoder_only(name, causal):
        pytest.skip(f"{name} is defined for decoders only (encoder mode refused)")
    model = poslab.build_model(tiny_config(name, causal=causal)).double().eval()
    perturb_parameters(model)
    x = torch.randint(0, 13, (2, 14))
    with torch.no_grad():
        packed = model(x, document_ids=packed_ids())
        for row, start, stop in documents():
            alone = model(x[row : row + 1, start:stop])[0]
            torch.testing.assert_close(packed[row, start:stop], alone, atol=1e-10, rtol=1e-10)


def test_packed_gradients_equal_the_sum_over_documents():
    model = poslab.build_model(tiny_config("cope+rope")).double()
    perturb_parameters(model)
    x = torch.randint(0, 13, (2, 14))
    model(x, document_ids=packed_ids()).square().sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    sum(model(x[r : r + 1, a:b]).square().sum() for r, a, b in documents()).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=1e-10, rtol=1e-8, msg=n)


def test_attend_with_document_ids_equals_each_document_alone():
    enc = poslab.build_encoding("cope[sep_key=true]", n_heads=2, head_dim=8).double()
    q, k, v = (torch.randn(2, 2, 14, 8, dtype=torch.float64) for _ in range(3))
    extra = enc.input_keys(torch.randn(2, 14, 16, dtype=torch.float64))
    out = poslab.attend(q, k, v, enc, document_ids=packed_ids(), extra_keys=extra)
    for r, a, b in documents():
        alone = poslab.attend(q[r : r + 1, :, a:b], k[r : r + 1, :, a:b], v[r : r + 1, :, a:b], enc,
                              extra_keys=extra[r : r + 1, :, a:b])  # fmt: skip
        torch.testing.assert_close(out[r : r + 1, :, a:b], alone, atol=1e-12, rtol=0)
    # one document per row is the plain attention
    same = torch.zeros(2, 14, dtype=torch.long)
    torch.testing.assert_close(poslab.attend(q, k, v, enc, document_ids=same, extra_keys=extra),
                               poslab.attend(q, k, v, enc, extra_keys=extra))  # fmt: skip


def test_document_ids_errors():
    model = poslab.build_model(tiny_config("rope"))
    x = torch.randint(0, 13, (2, 14))
    with pytest.raises(ValueError, match="take no KV cache"):
        model(x, document_ids=packed_ids(), cache=model.new_cache())
    with pytest.raises(ValueError, match=r"must have the shape of the token ids \(2, 14\)"):
        model(x, document_ids=packed_ids()[:, :5])
    with pytest.raises(ValueError, match="document_ids must be \\(B, T\\) integers"):
        model(x, document_ids=packed_ids().float())
    q = torch.randn(2, 2, 14, 8)
    with pytest.raises(ValueError, match="document_ids need a full forward"):
        poslab.attend(q[:, :, -3:], q, q, None, document_ids=packed_ids()[:, -3:])
