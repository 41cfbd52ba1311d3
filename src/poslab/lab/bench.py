"""Benchmarks: attention and training-step speed against baselines measured in the same run, peak
memory at long lengths, and cached against recomputed decoding.

Every ratio is measured side by side: the candidates of one table are run interleaved, round after
round, and the median of each is divided by the baseline's median from the same rounds. Timings on a
shared machine are noisy; ratios from one run are the quantity to read, not absolute milliseconds.
This is a benchmark, never a test: nothing here asserts a speed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import poslab
from poslab import allocator
from poslab.encodings.cope import CoPE
from poslab.encodings.dape import DAPE
from poslab.kernels import cope as cope_kernel
from poslab.kernels import native
from poslab.lab.checkpoint import write_text
from poslab.model import ModelConfig, build_model, masked_cross_entropy

# The encodings added after the two papers (docs/encodings.md), in every table.
NEWER = ["fox", "cable", "selective", "pope", "stickbreaking"]
ATTENTION_ENCODINGS = [
    "nope",
    "rope",
    "alibi",
    "kerple_log",
    "kerple_power",
    "fire",
    "t5",
    "sandwich",
    "cope",
    "cope+rope",
    "dape",
    "dape[kernel_size=3]",
    *NEWER,
]
STEP_ENCODINGS = [
    "rope",
    "nope",
    "alibi",
    "kerple_log",
    "kerple_power",
    "fire",
    "t5",
    "sandwich",
    "relative",
    "cope",
    "dape",
    "dape[base=kerple_log]",
    *NEWER,
]
DECODE_ENCODINGS = ["nope", "rope", "alibi", "cope", "dape", "dape[kernel_size=3]", *NEWER]
# torch.compile against eager: the SDPA paths, a bias, and the two custom-op kernels.
COMPILE_ENCODINGS = ["rope", "alibi", "kerple_log", "cope", "dape"]
MEMORY_ENCODINGS = [
    "nope", "learned", "sinusoidal", "rope", "alibi", "t5", "kerple_log", "kerple_power", "fire", "sandwich",
    "relative", "cope", "cope+rope", "dape", "dape[base=kerple_log]", "dape[kernel_size=3]", *NEWER,
]  # fmt: skip


@dataclass
class Table:
    """One benchmark table: a title, column names and rows (dicts), plus the settings it ran with."""

    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        def fmt(v: Any) -> str:
            return f"{v:.2f}" if isinstance(v, float) else str(v)

        lines = [f"### {self.title}", "", f"settings: {json.dumps(self.settings)}", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each function, running them in turn, round after round (warm-up rounds first)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _perturbed(encoding: poslab.PositionEncoding) -> poslab.PositionEncoding:
    """Zero-initialised tables (CoPE) would make some work trivially cheap: give them values."""
    with torch.no_grad():
        for p in encoding.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return encoding


def bench_attention(
    *, batch: int = 8, heads: int = 4, length: int = 512, head_dim: int = 32, repeats: int = 7,
    encodings: list[str] | None = None, device: str = "cpu",
) -> Table:  # fmt: skip
    """Causal attention of each encoding, 'auto' path (after) and eager reference (before), against
    causal SDPA; forward+backward and forward only."""
    dev = torch.device(device)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=dev, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, length, head_dim, device=dev)

    def fwd_bwd(fn):
        def run():
            fn().backward(grad)
            _sync(dev)

        return run

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
            _sync(dev)

        return run

    def plain_materialised():
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        mask = torch.ones(length, length, dtype=torch.bool, device=dev).tril()
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v

    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa (causal)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "plain materialised": plain_materialised,
    }
    paths = {"sdpa (causal)": "sdpa", "plain materialised": "eager"}
    # The layer input, for the encodings whose input_keys hook reads it (FoX's and CABLE's gates);
    # computed once, outside the timing, as a model computes it once per layer.
    x = torch.randn(batch, length, heads * head_dim, device=dev)
    for name in encodings or ATTENTION_ENCODINGS:
        enc = _perturbed(poslab.build_encoding(name, n_heads=heads, head_dim=head_dim, causal=True)).to(dev)
        reads_input = "input_keys" in enc.hooks and not enc.queries_as_extra_keys
        extra = {"extra_keys": enc.input_keys(x).detach()} if reads_input else {}
        candidates[f"{name}"] = lambda enc=enc, extra=extra: poslab.attend(q, k, v, enc, **extra)
        paths[name] = attention_path(enc, q)
        for label, path, fn in _other_paths(enc, q):
            candidates[f"{name} ({label})"] = lambda enc=enc, fn=fn: fn(poslab.attend, q, k, v, enc)
            paths[f"{name} ({label})"] = path
        if enc.uses_logits or enc.replaces_softmax:
            candidates[f"{name} (eager)"] = lambda enc=enc, extra=extra: poslab.attend(
                q, k, v, enc, impl="eager", **extra
            )
            paths[f"{name} (eager)"] = "eager"
    both = interleaved_medians({n: fwd_bwd(f) for n, f in candidates.items()}, repeats=repeats)
    forward = interleaved_medians({n: fwd(f) for n, f in candidates.items()}, repeats=repeats)
    base_b, base_f = both["sdpa (causal)"], forward["sdpa (causal)"]
    table = Table(
        "Attention, causal, against SDPA in the same run",
        ["attention", "path", "fwd+bwd ms", "fwd+bwd / sdpa", "fwd ms", "fwd / sdpa"],
        settings=dict(
            batch=batch,
            heads=heads,
            length=length,
            head_dim=head_dim,
            repeats=repeats,
            device=device,
            **machine_settings(heads),
        ),
    )
    for name in candidates:
        table.rows.append(
            {
                "attention": name,
                "path": paths.get(name, "auto"),
                "fwd+bwd ms": both[name] * 1e3,
                "fwd+bwd / sdpa": both[name] / base_b,
                "fwd ms": forward[name] * 1e3,
                "fwd / sdpa": forward[name] / base_f,
            }
        )
    return table


def bench_train_step(
    *, d_model: int = 128, layers: int = 2, heads: int = 4, batch: int = 8, length: int = 512,
    vocab: int = 256, repeats: int = 7, encodings: list[str] | None = None, device: str = "cpu",
) -> Table:  # fmt: skip
    """One AdamW training step of a small decoder per encoding, against the RoPE model."""
    dev = torch.device(device)
    names = encodings or STEP_ENCODINGS
    if "rope" not in names:
        names = ["rope", *names]
    x = torch.randint(0, vocab, (batch, length + 1), device=dev)
    probe = torch.empty(1, heads, 1, d_model // heads, device=dev)  # stands for the model's queries
    steps, paths = {}, {}
    for name in names:
        cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, encoding=name)
        model = build_model(cfg).to(dev)
        _perturbed_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            masked_cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
            opt.step()
            _sync(dev)

        steps[name] = step
        paths[name] = ", ".join(sorted({attention_path(enc, probe) for enc in model.encodings}))
        for label, path, fn in _other_paths(model.encodings[0], probe):
            steps[f"{name} ({label})"] = lambda step=step, fn=fn: fn(step)
            paths[f"{name} ({label})"] = path
    medians = interleaved_medians(steps, repeats=repeats)
    table = Table(
        "Training step (forward, backward, AdamW), against the RoPE model in the same run",
        ["encoding", "path", "step ms", "step / rope"],
        settings=dict(
            d_model=d_model,
            layers=layers,
            heads=heads,
            batch=batch,
            length=length,
            device=device,
            **machine_settings(heads),
        ),
    )
    for name in steps:
        table.rows.append(
            {
                "encoding": name,
                "path": paths[name],
                "step ms": medians[name] * 1e3,
                "step / rope": medians[name] / medians["rope"],
            }
        )
    return table


def uses_native_mlp(encoding: poslab.PositionEncoding, q: torch.Tensor) -> bool:
    """Whether DAPE's MLP (in ``encoding`` or one of its parts) runs in the C++ kernel for ``q``."""
    return any(p.runs_natively(q) for p in _fused_dape_parts(encoding))


def _fused_dape_parts(encoding: poslab.PositionEncoding) -> list[DAPE]:
    return [p for p in getattr(encoding, "parts", [encoding]) if isinstance(p, DAPE) and p.has_fused_kernel]


def _fused_cope_parts(encoding: poslab.PositionEncoding) -> list[CoPE]:
    parts = getattr(encoding, "parts", [encoding])
    return [p for p in parts if isinstance(p, CoPE) and not (p.sep_key or p.val_gates)]


def uses_native_cope(encoding: poslab.PositionEncoding, q: torch.Tensor) -> bool:
    """Whether CoPE's row work (in ``encoding`` or one of its parts) runs in the C++ kernel for ``q``
    (causal attention, the parameters in q's dtype)."""
    return any(cope_kernel.uses_native(q, p.pos_emb.to(q.dtype)) for p in _fused_cope_parts(encoding))


def attention_path(encoding: poslab.PositionEncoding, q: torch.Tensor) -> str:
    """Which path ``poslab.attend`` takes for ``encoding`` by default: for DAPE and CoPE the C++
    kernel (and the level it was built for) or their PyTorch path (DAPE V2: eager); 'auto' for the
    others."""
    if _fused_cope_parts(encoding):
        return f"C++ {native.arch()}" if uses_native_cope(encoding, q) else "PyTorch"
    parts = _fused_dape_parts(encoding)
    if not parts:
        return "auto"
    if uses_native_mlp(encoding, q):
        return f"C++ {native.arch()}"
    return "eager" if any(p.kernel_size > 1 for p in parts) else "PyTorch MLP"


def _other_paths(encoding: poslab.PositionEncoding, q: torch.Tensor) -> list[tuple[str, str, Callable]]:
    """(label, path, runner) for each DAPE or CoPE path the default did not take, to time side by
    side: the PyTorch path when the default is the C++ kernel, the kernel when the guard declined it."""
    if q.device.type != "cpu":
        return []
    if _fused_cope_parts(encoding):
        if not native.cope_supports(q):
            return []
        if uses_native_cope(encoding, q):
            return [("PyTorch", "PyTorch", _without_native)]
        return [("C++ forced", f"C++ {native.arch()}", _with_native)]
    parts = _fused_dape_parts(encoding)
    if not parts or not native.available(q.shape[1]):
        return []
    if uses_native_mlp(encoding, q):
        if any(p.kernel_size > 1 for p in parts):
            return []  # V2's other path is the eager one, which has its own row
        return [("PyTorch MLP", "PyTorch MLP", _without_native)]
    return [("C++ forced", f"C++ {native.arch()}", _with_native)]


def _without_native(fn: Callable[..., Any], *args: Any) -> Any:
    with native.switched_off():
        return fn(*args)


def _with_native(fn: Callable[..., Any], *args: Any) -> Any:
    with native.forced():
        return fn(*args)


def machine_settings(heads: int) -> dict[str, Any]:
    """The CPU, the native kernel's build and whether glibc's allocator was tuned (``poslab``
    tunes it unless POSLAB_NO_MALLOC_TUNING=1; a library user's process is untuned)."""
    return {
        "cpu": native.cpu_model(),
        "threads": torch.get_num_threads(),
        "native_kernel": native.build_info(heads) if native.available(heads) else "off",
        "native_mode": native.mode(),
        "allocator_tuned": allocator.allocator_tuned(),
    }


def _perturbed_model(model: torch.nn.Module) -> None:
    for enc in model.encodings:
        _perturbed(enc)


def bench_decode(
    *, n_new: int = 256, cases: tuple[tuple[int, int], ...] = ((1, 16), (8, 16), (1, 256)),
    d_model: int = 128, layers: int = 2, heads: int = 4, repeats: int = 3,
    encodings: list[str] | None = None, device: str = "cpu",
) -> Table:  # fmt: skip
    """Greedy generation of n_new tokens with the KV cache against recomputing the full forward,
    for each (batch, prompt length) case. One sequence after a short prompt is the cache's hardest
    case (a step costs a fixed number of small operations while recomputing a small model over a
    few hundred tokens is cheap); with several sequences the cached step reads the weights once for
    all of them, and with a longer prompt recomputation has more tokens to redo."""
    dev = torch.device(device)
    table = Table(
        "Decoding with the KV cache against recomputing the full forward each step",
        ["encoding", "batch", "prompt", "cached s", "recompute s", "speed-up", "identical"],
        settings=dict(
            n_new=n_new, d_model=d_model, layers=layers, heads=heads, repeats=repeats, device=device
        ),
    )
    for name in encodings or DECODE_ENCODINGS:
        cfg = ModelConfig(
            vocab_size=256,
            d_model=d_model,
            n_layers=layers,
            n_heads=heads,
            encoding=name,
            max_len=max(prompt for _, prompt in cases) + n_new,
        )
        model = build_model(cfg).to(dev).eval()
        _perturbed_model(model)
        for batch, prompt in cases:
            x = torch.randint(0, 256, (batch, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
            for use_cache in (True, False):  # warm-up: first-call allocations and tables
                model.generate(x, min(n_new, 4), use_cache=use_cache)
            outs: dict[str, torch.Tensor] = {}
            runs = {
                "cached": lambda m=model, x=x: m.generate(x, n_new, use_cache=True),
                "full": lambda m=model, x=x: m.generate(x, n_new, use_cache=False),
            }
            if name == "nope":
                runs["floor"] = lambda m=model, x=x: lean_nope_generate(m, x, n_new)
            medians = interleaved_medians(
                {key: lambda key=key, fn=fn, o=outs: o.__setitem__(key, fn()) for key, fn in runs.items()},
                repeats=repeats,
                warmup=0,
            )
            for key, label in (("cached", name), ("floor", f"{name}, hand-written step")):
                if key in runs:
                    table.rows.append(
                        {
                            "encoding": label,
                            "batch": batch,
                            "prompt": prompt,
                            "cached s": medians[key],
                            "recompute s": medians["full"],
                            "speed-up": medians["full"] / medians[key],
                            "identical": bool(torch.equal(outs[key], outs["full"])),
                        }
                    )
    return table


def lean_nope_generate(model: torch.nn.Module, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy cached decoding of a pre-LN NoPE decoder written as bare functional calls into
    preallocated caches: no modules, encoding hooks or checks. Not a library path: the bench's
    estimate of the fastest cached step eager PyTorch allows for this architecture, against which
    the library's step is judged."""
    cfg = model.config
    if cfg.encoding != "nope" or cfg.norm != "pre" or not cfg.causal:
        raise ValueError("lean_nope_generate takes a causal pre-LN NoPE model")
    (batch, n_prompt), d, h, dh = prompt.shape, cfg.d_model, cfg.n_heads, cfg.head_dim
    total = n_prompt + n_new
    with torch.inference_mode():
        weight = model.embed.weight
        caches = [
            (weight.new_empty(batch, h, total, dh), weight.new_empty(batch, h, total, dh))
            for _ in model.blocks
        ]
        out = prompt.new_empty(batch, total)
        out[:, :n_prompt] = prompt
        ids, n = prompt, 0
        for step in range(n_new):
            t = ids.shape[1]
            x = F.embedding(ids, weight)
            for block, (k_cache, v_cache) in zip(model.blocks, caches, strict=True):
                y = F.layer_norm(x, (d,), block.norm1.weight, block.norm1.bias)
                qkv = F.linear(y, block.attn.qkv.weight, block.attn.qkv.bias)
                q, k, v = qkv.view(batch, t, 3, h, dh).permute(2, 0, 3, 1, 4)
                k_cache[:, :, n : n + t], v_cache[:, :, n : n + t] = k, v
                y = F.scaled_dot_product_attention(
                    q, k_cache[:, :, : n + t], v_cache[:, :, : n + t], is_causal=t > 1
                )
                x = x + F.linear(
                    y.transpose(1, 2).reshape(batch, t, d), block.attn.out.weight, block.attn.out.bias
                )
                y = F.layer_norm(x, (d,), block.norm2.weight, block.norm2.bias)
                up, down = block.mlp[0], block.mlp[2]
                x = x + F.linear(F.gelu(F.linear(y, up.weight, up.bias)), down.weight, down.bias)
            logits = F.linear(
                F.layer_norm(x[:, -1], (d,), model.norm.weight, model.norm.bias), model.head.weight
            )
            out[:, n_prompt + step] = logits.argmax(-1)
            ids, n = out[:, n_prompt + step : n_prompt + step + 1], n + t
    return out.clone()


def bench_compile(
    *, batch: int = 8, heads: int = 4, length: int = 512, head_dim: int = 32, d_model: int = 128,
    layers: int = 2, vocab: int = 256, repeats: int = 7, encodings: list[str] | None = None,
    device: str = "cpu", backend: str = "inductor",
) -> Table:  # fmt: skip
    """Eager against ``torch.compile(fullgraph=True)`` (inductor, default mode), side by side per
    encoding: causal attention forward+backward (the attention section's shapes) and a training step
    of the step section's model, whose loss (forward) is compiled and whose backward runs the
    compiled backward graph; the AdamW update stays eager in both.

    The first call of a compiled function traces and compiles it (inductor writes and builds C++ on
    CPU): its seconds are the 'first call s' column, not in the medians. A failed compilation is a
    row saying why, not an error. Dynamo's caches are cleared between encodings. ``backend``: another
    torch.compile backend (the tests take 'aot_eager', which compiles no C++)."""
    dev = torch.device(device)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=dev, requires_grad=True) for _ in range(3))
    grad = torch.randn(batch, heads, length, head_dim, device=dev)
    tokens = torch.randint(0, vocab, (batch, length + 1), device=dev)
    table = Table(
        f"torch.compile ({backend}, default mode, fullgraph) against eager, side by side",
        ["encoding", "what", "path", "eager ms", "compiled ms", "compiled / eager", "first call s"],
        settings=dict(
            batch=batch, heads=heads, length=length, head_dim=head_dim, d_model=d_model, layers=layers,
            repeats=repeats, device=device, backend=backend, torch=torch.__version__,
            **machine_settings(heads),
        ),
    )  # fmt: skip
    for name in encodings or COMPILE_ENCODINGS:
        enc = _perturbed(poslab.build_encoding(name, n_heads=heads, head_dim=head_dim, causal=True)).to(dev)

        def attention(q, k, v, enc=enc):
            return poslab.attend(q, k, v, enc)

        def attention_run(fn):
            def run():
                fn(q, k, v).backward(grad)
                _sync(dev)

            return run

        cfg = ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=layers, n_heads=heads, encoding=name)
        model = build_model(cfg).to(dev)
        _perturbed_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def loss(x, model=model):
            return masked_cross_entropy(model(x[:, :-1]), x[:, 1:])

        def step_run(fn, opt=opt):
            def run():
                opt.zero_grad(set_to_none=True)
                fn(tokens).backward()
                opt.step()
                _sync(dev)

            return run

        probe = torch.empty(1, heads, 1, head_dim, device=dev)
        for what, fn, runner in (
            ("attention fwd+bwd", attention, attention_run),
            ("train step", loss, step_run),
        ):
            row = {"encoding": name, "what": what, "path": attention_path(enc, probe)}
            table.rows.append(row)
            eager = runner(fn)
            compiled = runner(torch.compile(fn, fullgraph=True, backend=backend))
            start = time.perf_counter()
            try:
                compiled()  # traces and compiles the forward and, at its backward, the backward
            except Exception as error:  # a row saying why, then the next encoding
                row["compiled ms"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}"
                continue
            row["first call s"] = time.perf_counter() - start
            medians = interleaved_medians({"eager": eager, "compiled": compiled}, repeats=repeats)
            row["eager ms"], row["compiled ms"] = medians["eager"] * 1e3, medians["compiled"] * 1e3
            row["compiled / eager"] = medians["compiled"] / medians["eager"]
        torch._dynamo.reset()
    return table


def _peak_memory_child(name: str, length: int, layers: int, d_model: int, heads: int, device: str) -> dict:
    """Run in a fresh process: one forward at ``length``; report the memory it added at its peak."""
    dev = torch.device(device)
    cfg = ModelConfig(
        vocab_size=256, d_model=d_model, n_layers=layers, n_heads=heads, encoding=name, max_len=length
    )
    model = build_model(cfg).to(dev).eval()
    x = torch.randint(0, 256, (1, length), device=dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
    else:
        before = _max_rss_bytes()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    elapsed = time.perf_counter() - start
    finite = bool(torch.isfinite(logits).all())
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else _max_rss_bytes()
    return {"encoding": name, "peak MB": peak / 2**20, "added MB": (peak - before) / 2**20,
            "seconds": elapsed, "finite": finite}  # fmt: skip


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def bench_memory(
    *, length: int = 16384, layers: int = 4, d_model: int = 256, heads: int = 4,
    encodings: list[str] | None = None, device: str = "cpu",
) -> Table:  # fmt: skip
    """Peak memory of one inference forward at ``length`` (B=1), each encoding in its own process.

    On CPU the peak is the process's maximum resident set (it includes Python, torch and the model);
    'added' is the peak minus the maximum before the forward. On CUDA both are allocator numbers.
    """
    table = Table(
        "Inference peak memory at long length (B=1), one process per encoding",
        ["encoding", "peak MB", "added MB", "seconds", "finite"],
        settings=dict(length=length, layers=layers, d_model=d_model, heads=heads, device=device),
    )
    for name in encodings or MEMORY_ENCODINGS:
        call = f"_peak_memory_child({name!r}, {length}, {layers}, {d_model}, {heads}, {device!r})"
        code = f"import json; from poslab.lab.bench import _peak_memory_child; print(json.dumps({call}))"
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy()
        )
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            table.rows.append({"encoding": name, "peak MB": "failed", "added MB": last[:60]})
            continue
        table.rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


SECTIONS = ("attention", "step", "decode", "memory", "compile")
DEFAULT_SECTIONS = SECTIONS[:4]  # compile (minutes of inductor compilation) only when asked


def run_bench(
    sections: list[str] | tuple[str, ...] = DEFAULT_SECTIONS, *, out: str | Path | None = None,
    quick: bool = False, device: str = "cpu", progress: Callable[[str], None] = print,
) -> list[Table]:  # fmt: skip
    """Run the chosen sections, print each table as it finishes, and write them all as JSON to ``out``."""
    if not sections:  # e.g. --sections , : an empty bench.json would replace the last one
        raise ValueError(f"no bench section given; choose from {', '.join(SECTIONS)}")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown bench section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    small = dict(length=128, repeats=3) if quick else {}
    tables = []
    for number, section in enumerate(sections, 1):
        # a section takes minutes: say what is being timed before its table appears
        progress(f"bench: section {number}/{len(sections)}, {section} ...")
        if section == "attention":
            table = bench_attention(device=device, **small)
        elif section == "step":
            table = bench_train_step(device=device, **small)
        elif section == "compile":
            table = bench_compile(device=device, **small)
        elif section == "decode":
            table = bench_decode(
                device=device, **({"n_new": 32, "cases": ((1, 16),), "repeats": 1} if quick else {})
            )
        else:
            table = bench_memory(device=device, **({"length": 2048} if quick else {}))
        progress(table.markdown() + "\n")
        tables.append(table)
    if out is not None:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        # through the one atomic writer: a full disk is a one-line error, the old file stays whole
        write_text(path, json.dumps([t.__dict__ for t in tables], indent=2, default=str))
    return tables
