"""Fused attention kernels for context-dependent encodings (CoPE, DAPE), per query block."""
