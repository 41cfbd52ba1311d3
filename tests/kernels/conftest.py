"""Without a GPU the Triton kernel tests run through triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, when this directory's tests are collected
(nothing in poslab imports triton before a Triton kernel runs)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
