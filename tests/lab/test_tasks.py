"""Tests of the synthetic tasks: every generator is checked against an independent brute-force
solver that recomputes the answer from the decoded input text."""

from __future__ import annotations

import math
import re
import time

import pytest
import torch
import torch.nn.functional as F

from poslab.lab.tasks import TASKS, Batch, ChomskyTask, Task, build_task, list_tasks
from poslab.lab.tasks.chomsky import chomsky_tasks

CAUSAL = ["flipflop", "selective_copy", "counting"]
PROBES = ["passkey", "mqar", "repeated_text"]  # causal too; their checkers read ids (bytes)
CHOMSKY = chomsky_tasks()  # the 15 tasks, by level
# A typical training length per causal task (pairs, content tokens, max statements).
CAUSAL_LENGTH = {"flipflop": 64, "selective_copy": 16, "counting": 40}
CAUSAL_LENGTH.update(dict.fromkeys(PROBES, 128))  # tokens
CHANCE = {  # the table of docs/tasks.md
    **dict.fromkeys(["modular_arithmetic_simple", "cycle_navigation", "modular_arithmetic"], 20.0),
    **dict.fromkeys(["solve_equation", "bucket_sort"], 20.0),
    "counting": 100 / 11,  # answers 0..10
    "selective_copy": 100 / 8,  # 8 content symbols by default
    "passkey": 10.0,  # a digit
    "mqar": 100 / 512,  # 512 values by default
    "repeated_text": 100 / 257,  # bytes and <eos>
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def length_for(task: Task, name: str) -> int:
    return CAUSAL_LENGTH[name] if task.causal else 23


# -- independent solvers ---------------------------------------------------------------------------
# Causal: the full token sequence -> {target index: expected token}; the target at index t is
# sequence[t + 1], so these are also exactly the positions that must be scored.


def solve_flipflop(seq: list[str]) -> dict[int, str]:
    assert seq[0] == "w" and seq[-2] == "r"
    expected, last_write = {}, None
    for k in range(len(seq) // 2):
        instruction, bit = seq[2 * k], seq[2 * k + 1]
        assert instruction in "wri" and bit in "01"
        if instruction == "w":
            last_write = bit
        elif instruction == "r":
            expected[2 * k] = last_write
    return expected


def solve_selective_copy(seq: list[str]) -> dict[int, str]:
    sep = seq.index("|")
    content = [t for t in seq[:sep] if t != "_"]
    return {sep + i: token for i, token in enumerate(content)}


def solve_counting(seq: list[str]) -> dict[int, str]:
    seq = [t for t in seq if t != "<pad>"]
    env: dict[str, int] = {}
    i = 0
    while seq[i] != "print":
        if seq[i] == "pass;":
            i += 1
        elif seq[i + 1] == "++;":
            env[seq[i]] += 1  # KeyError: increment of an unset variable
            assert env[seq[i]] <= 10
            i += 2
        else:
            assert seq[i + 1 : i + 4] == ["=", "0", ";"], seq[i : i + 4]
            env[seq[i]] = 0
            i += 4
    assert i + 3 == len(seq)  # print, the variable, the answer
    return {i + 1: str(env[seq[i + 1]])}


def count_statements(seq: list[str]) -> int:
    return sum(t in ("pass;", "++;", ";") for t in seq)


# Chomsky: the input tokens -> the expected output tokens (end token included).


def _bits(text: str) -> int:
    return int(text, 2)


def _le(value: int) -> list[str]:
    return list(bin(value)[2:][::-1])


def _isqrt_bisect(v: int) -> int:
    lo, hi = 0, 1 << (v.bit_length() // 2 + 1)
    while lo < hi:  # largest r with r * r <= v
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if mid * mid <= v else (lo, mid - 1)
    return lo


def solve_stack(s: list[str]) -> list[str]:
    first_op = next((i for i, t in enumerate(s) if t not in "01"), len(s))
    assert first_op >= 1 and all(t not in ("0", "1") for t in s[first_op:])
    stack: list[str] = []
    for t in s:
        if t == "POP":
            stack = stack[:-1]
        else:
            stack.append(t[-1])  # "0", "1", "PUSH0", "PUSH1"
    return [*reversed(stack), "END"]


def solve_missing_duplicate(s: list[str]) -> list[str]:
    s = s[:-1] if s[-1] == "#" else s
    half = len(s) // 2
    k = s.index("_")
    answer = s[k + half] if k < half else s[k - half]
    filled = s[:k] + [answer] + s[k + 1 :]
    assert filled[:half] == filled[half:]
    return [answer]


def solve_equation(s: list[str]) -> list[str]:
    lhs, rhs = "".join(s).split("=")
    roots = [v for v in range(5) if eval(lhs.replace("x", str(v))) % 5 == int(rhs)]
    assert len(roots) == 1, (lhs, rhs, roots)
    return [str(roots[0])]


def solve_binary(s: list[str], op: str) -> list[str]:
    a, b = "".join(s).split(op)
    x, y = _bits(a[::-1]), _bits(b[::-1])
    assert x > 0 and y > 0
    return [*_le(x + y if op == "+" else x * y), "END"]


def solve_odds_first(s: list[str]) -> list[str]:
    """0-based odd indices (1-based even positions) first, as DeepMind's code."""
    return [s[i] for i in range(1, len(s), 2)] + [s[i] for i in range(0, len(s), 2)]


def solve_sqrt(s: list[str]) -> list[str]:
    return list(bin(_isqrt_bisect(_bits("".join(s))))[2:].zfill(math.ceil(len(s) / 2)))


CHOMSKY_SOLVERS = {
    "even_pairs": lambda s: ["odd" if sum(s[i] != s[i + 1] for i in range(len(s) - 1)) % 2 else "even"],
    "modular_arithmetic_simple": lambda s: [str(eval("".join(s)) % 5)],
    "parity_check": lambda s: ["odd" if s.count("1") % 2 else "even"],
    "cycle_navigation": lambda s: [str(sum(int(t) for t in s) % 5)],
    "stack_manipulation": solve_stack,
    "reverse_string": lambda s: s[::-1],
    "modular_arithmetic": lambda s: [str(eval("".join(s)) % 5)],
    "solve_equation": solve_equation,
    "duplicate_string": lambda s: s + s,
    "missing_duplicate": solve_missing_duplicate,
    "odds_first": solve_odds_first,
    "binary_addition": lambda s: solve_binary(s, "+"),
    "binary_multiplication": lambda s: solve_binary(s, "*"),
    "compute_sqrt": solve_sqrt,
    "bucket_sort": sorted,
}
CAUSAL_SOLVERS = {
    "flipflop": solve_flipflop,
    "selective_copy": solve_selective_copy,
    "counting": solve_counting,
}


def full_sequence(task: Task, batch: Batch, b: int) -> list[str]:
    """Causal tasks: targets = sequence[1:], so the sequence is the first input then the targets."""
    ids = torch.cat([batch.inputs[b, :1], batch.targets[b]])
    return task.decode(ids).split(" ")


def check_causal(task: Task, batch: Batch) -> None:
    for b in range(batch.inputs.shape[0]):
        expected = CAUSAL_SOLVERS[task.name](full_sequence(task, batch, b))
        scored = batch.mask[b].nonzero().flatten().tolist()
        assert scored == sorted(expected)
        got = task.decode_outputs(batch.targets[b, scored]).split(" ") if scored else []
        assert got == [expected[i] for i in scored]


def check_chomsky(task: ChomskyTask, batch: Batch, length: int) -> None:
    n_in = (batch.inputs[0] != task.placeholder_id).sum().item()
    assert n_in == task.input_length(length)
    assert batch.inputs.shape[1] == n_in + task.output_length(n_in)
    for b in range(batch.inputs.shape[0]):
        tokens = task.decode(batch.inputs[b, :n_in]).split(" ")
        expected = CHOMSKY_SOLVERS[task.name](tokens)
        scored = batch.mask[b].nonzero().flatten().tolist()
        assert scored == list(range(n_in, n_in + len(expected)))  # nothing after the end token
        assert task.decode_outputs(batch.targets[b, scored]).split(" ") == expected


# -- generators against the solvers ----------------------------------------------------------------


def test_registry_holds_every_task() -> None:
    # "lm" samples windows of a real corpus; tests/test_extrapolate.py covers it.
    assert len(CHOMSKY) == 15 and sorted(CHOMSKY_SOLVERS) == sorted(CHOMSKY)
    assert sorted(CAUSAL + PROBES + CHOMSKY + ["lm"]) == list_tasks() == sorted(TASKS)
    assert [build_task(n).causal for n in CAUSAL + PROBES + CHOMSKY] == [True] * 6 + [False] * 15


@pytest.mark.parametrize("p", [0.8, 0.98, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_flipflop_against_solver(p: float, seed: int) -> None:
    task = build_task("flipflop")
    for length in (2, 3, 9, 64):
        check_causal(task, task.sample(16, length, generator=gen(seed), p=p))


@pytest.mark.parametrize("split", ["id", "ood_dense", "ood_sparse"])
@pytest.mark.parametrize("seed", [0, 1])
def test_selective_copy_against_solver(split: str, seed: int) -> None:
    task = build_task("selective_copy", n_blanks=20, n_symbols=5)
    for length in (1, 4, 16):
        batch = task.sample(16, length, generator=gen(seed), **task.splits()[split])
        check_causal(task, batch)
        assert batch.mask.sum(dim=1).eq(length).all()


@pytest.mark.parametrize("n_vars", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_counting_against_interpreter(n_vars: int, seed: int) -> None:
    task = build_task("counting", n_vars=n_vars)
    for max_steps in (3, 10, 40):
        batch = task.sample(32, max_steps, generator=gen(seed))
        check_causal(task, batch)
        for b in range(32):
            seq = full_sequence(task, batch, b)
            assert 3 <= count_statements(seq) <= max_steps
            assert {t for t in seq if t.isalpha() and len(t) == 1} <= set("abcde"[:n_vars])


@pytest.mark.parametrize("name", CHOMSKY)
def test_chomsky_against_solver(name: str) -> None:
    task = build_task(name)
    for seed, length in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 11, 16, 29, 40, 41, 97, 180]):
        check_chomsky(task, task.sample(12, length, generator=gen(seed)), length)


def _answers_by_symbol_counts(task: ChomskyTask, lengths: range, n: int) -> dict[tuple, set[tuple]]:
    """Sampled inputs grouped by their symbols in sorted order (the input up to its order): the set of
    answers each group has."""
    groups: dict[tuple, set[tuple]] = {}
    for length in lengths:
        batch = task.sample(n, length, generator=gen(length))
        m = task.input_length(length)
        for x, y, scored in zip(batch.inputs[:, :m], batch.targets, batch.mask, strict=True):
            groups.setdefault((length, *sorted(x.tolist())), set()).add(tuple(y[scored].tolist()))
    return groups


@pytest.mark.parametrize("name", CHOMSKY)
def test_permutation_invariant_chomsky_tasks_answer_the_same_for_any_order(name: str) -> None:
    # The three tasks flagged permutation-invariant (the DAPE paper's marked ones) give one answer per
    # input up to its order; reverse string and even pairs, where the order matters, do not.
    task = build_task(name)
    groups = _answers_by_symbol_counts(task, range(3, 8), 2000)
    if task.permutation_invariant:
        assert all(len(answers) == 1 for answers in groups.values())
        assert sum(len(answers) == 1 for answers in groups.values()) > 20  # many inputs share a group
    elif name in ("reverse_string", "even_pairs", "odds_first", "stack_manipulation"):
        assert any(len(answers) > 1 for answers in groups.values())
    flagged = {n for n in CHOMSKY if TASKS[n].permutation_invariant}
    assert flagged == {"parity_check", "cycle_navigation", "bucket_sort"}


@pytest.mark.parametrize("name", ["modular_arithmetic", "solve_equation", "binary_multiplication"])
def test_chomsky_longest_eval_length(name: str) -> None:
    task = build_task(name)
    check_chomsky(task, task.sample(4, 500, generator=gen(3)), 500)


def test_end_token_tasks_leave_padding_unscored() -> None:
    for name in ("stack_manipulation", "binary_addition", "binary_multiplication"):
        task = build_task(name)
        batch = task.sample(64, 12, generator=gen(0))
        n_in = 12
        outputs, mask = batch.targets[:, n_in:], batch.mask[:, n_in:]
        end = task.output_tokens.index("END")
        # Exactly one scored END per row, the last scored position; unscored outputs are padding 0.
        last = mask.long().cumsum(dim=1).argmax(dim=1)
        assert (outputs.gather(1, last[:, None]) == end).all()
        assert ((outputs == end) & mask).sum(dim=1).eq(1).all()
        assert outputs[~mask].eq(0).all()
        assert (~mask).any()  # some padding exists at this length


# -- the length-generalisation probes against their checkers ---------------------------------------
# Each checker reads the sequence (input ids: the first input then the targets), finds the structure
# in it without the task's code, and returns {target index: expected id} for the scored targets.


def full_ids(batch: Batch, b: int) -> list[int]:
    return torch.cat([batch.inputs[b, :1], batch.targets[b]]).tolist()


def check_scored(batch: Batch, b: int, expected: dict[int, int]) -> None:
    scored = batch.mask[b].nonzero().flatten().tolist()
    assert scored == sorted(expected)
    assert batch.targets[b, scored].tolist() == [expected[t] for t in scored]


def solve_passkey(ids: list[int]) -> tuple[dict[int, int], int, int]:
    """-> (expected answer digits, the key line's offset, the filler's size)."""
    text = bytes(ids).decode("ascii")
    lines = list(re.finditer(r"the pass key is (\d+)\. remember it\. ", text))
    assert len(lines) == 1, text
    answer = re.search(r"\nwhat is the pass key\? the pass key is (\d+)$", text)
    assert answer is not None and answer.group(1) == lines[0].group(1)
    key, start = answer.group(1), lines[0].start()
    filler = text[:start] + text[lines[0].end() : answer.start()]
    assert not re.search(r"\d|pass|key", filler)  # the filler hides no other key
    assert all(re.fullmatch(r"[a-z ]*", s.strip()) for s in filler.split(".")), filler
    n = len(ids) - 1  # targets
    return {n - len(key) + i: ord(d) for i, d in enumerate(key)}, start, len(filler)


@pytest.mark.parametrize("depth", [None, 0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("n_digits", [1, 5, 7])
def test_passkey_against_checker(depth: float | None, n_digits: int) -> None:
    task = build_task("passkey", n_digits=n_digits)
    for seed, length in enumerate([task.min_length, 128, 200, 1000]):
        batch = task.sample(8, length, generator=gen(seed), depth=depth)
        assert batch.inputs.shape == (8, length)  # the length is the context, exactly
        for b in range(8):
            expected, start, filler = solve_passkey(full_ids(batch, b))
            assert len(expected) == n_digits
            check_scored(batch, b, expected)
            if depth is not None:
                assert start == round(depth * filler)


def test_passkey_depths_and_keys_are_spread() -> None:
    task = build_task("passkey")
    batch = task.sample(400, 300, generator=gen(0))
    starts, digits = [], []
    for b in range(400):
        expected, start, filler = solve_passkey(full_ids(batch, b))
        starts.append(start / filler)
        digits += [chr(v) for v in expected.values()]
    assert min(starts) < 0.05 and max(starts) > 0.95 and abs(sum(starts) / 400 - 0.5) < 0.05
    counts = [digits.count(str(d)) for d in range(10)]
    assert min(counts) > 150 and max(counts) < 250  # 2000 digits, uniform


def test_passkey_splits_make_the_depth_by_length_grid() -> None:
    task = build_task("passkey", eval_lengths="512,128,256", eval_depths="0,0.5,1")
    splits = task.splits()
    assert list(splits) == ["id", "by_length", "depth_0", "depth_50", "depth_100"]
    assert splits["id"] == {"depth": None}
    assert splits["depth_50"] == {"depth": 0.5, "lengths": (128, 256, 512)}
    assert build_task("passkey", depth=0.25).splits() == {"id": {"depth": 0.25}}
    for name, params in splits.items():
        for length in task.split_lengths(name) or [128]:
            batch = task.sample(2, length, generator=gen(0), **params)
            assert batch.inputs.shape == (2, length)
            for b in range(2):
                _, start, filler = solve_passkey(full_ids(batch, b))
                if params["depth"] is not None:
                    assert start == round(params["depth"] * filler)
    with pytest.raises(ValueError, match="not one of the split's lengths"):
        task.sample(2, 300, generator=gen(0), **splits["depth_0"])


def solve_mqar(names: list[str], tokens_per_pair: int = 8, max_pairs: int | None = None) -> dict[int, int]:
    n = len(names) // tokens_per_pair if max_pairs is None else min(len(names) // tokens_per_pair, max_pairs)
    pairs = names[: 2 * n]
    keys, values = pairs[0::2], pairs[1::2]
    assert all(k[0] == "k" for k in keys) and all(v[0] == "v" for v in values)
    assert len(set(keys)) == n  # distinct keys
    table = dict(zip(keys, values, strict=True))
    expected, asked = {}, []
    i = 2 * n
    while i < len(names):
        if names[i] == ".":
            i += 1
            continue
        assert names[i] in table and names[i + 1] == table[names[i]], names[i : i + 2]
        expected[i] = names[i + 1]  # the target at index i is sequence[i + 1]
        asked.append(names[i])
        i += 2
    assert sorted(asked) == sorted(keys)  # every key asked once
    return expected


@pytest.mark.parametrize("tokens_per_pair", [4, 5, 8])
@pytest.mark.parametrize("seed", [0, 1])
def test_mqar_against_checker(tokens_per_pair: int, seed: int) -> None:
    task = build_task("mqar", n_keys=64, n_values=10, tokens_per_pair=tokens_per_pair)
    for length in (tokens_per_pair - 1, 31, 128, 255):
        batch = task.sample(8, length, generator=gen(seed))
        assert batch.inputs.shape == (8, length)
        for b in range(8):
            names = task.decode(full_ids(batch, b)).split(" ")
            expected = solve_mqar(names, tokens_per_pair)
            assert len(expected) == (length + 1) // tokens_per_pair
            check_scored(batch, b, {t: task.tokens.index(v) for t, v in expected.items()})


def test_mqar_lookups_grow_with_the_length() -> None:
    task = build_task("mqar", eval_lengths=(128, 1024))
    assert task.splits() == {"id": {}, "by_length": {"lengths": (128, 1024)}}
    distances = {}
    for length in (128, 1024):
        batch = task.sample(16, length, generator=gen(0))
        names = [task.decode(full_ids(batch, b)).split(" ") for b in range(16)]
        gaps = [t - seq.index(seq[t]) for seq in names for t in solve_mqar(seq)]
        distances[length] = sum(gaps) / len(gaps)
        assert batch.mask.sum(dim=1).eq((length + 1) // 8).all()
    assert 6 < distances[1024] / distances[128] < 10  # 8x the length, about 8x the distance
    with pytest.raises(ValueError, match="n_keys"):
        build_task("mqar", n_keys=16, eval_lengths=(136,))


def test_mqar_with_a_cap_keeps_its_pairs_and_lengthens_the_lookups() -> None:
    task = build_task("mqar", n_keys=32, n_values=8, max_pairs=24, eval_lengths=(128, 1024))
    distances = {}
    for length in (128, 1024):
        batch = task.sample(8, length, generator=gen(1))
        names = [task.decode(full_ids(batch, b)).split(" ") for b in range(8)]
        solved = [solve_mqar(seq, 8, max_pairs=24) for seq in names]
        assert all(len(s) == min((length + 1) // 8, 24) for s in solved)
        for b, expected in enumerate(solved):
            check_scored(batch, b, {t: task.tokens.index(v) for t, v in expected.items()})
        gaps = [t - seq.index(seq[t]) for seq, s in zip(names, solved, strict=True) for t in s]
        distances[length] = sum(gaps) / len(gaps)
    assert distances[1024] > 5 * distances[128]  # 16 -> 24 pairs, look-ups about 8x as long
    with pytest.raises(ValueError, match="max_pairs"):
        build_task("mqar", max_pairs=0)


@pytest.fixture(scope="module")
def stdlib_streams() -> dict[str, bytes]:
    data = build_task("lm", corpus="stdlib", tokenizer="bytes").data
    return {s: bytes(data.stream(s).clamp(max=255).to(torch.uint8).tolist()) for s in ("train", "validation")}


@pytest.mark.parametrize("gap", [0.0, 0.5])
def test_repeated_text_against_checker(gap: float, stdlib_streams: dict[str, bytes]) -> None:
    task = build_task("repeated_text", gap=gap, eval_lengths=(64, 255))
    for split in ("id", "by_length"):
        params = task.splits()[split]
        stream = stdlib_streams[params["split"]]
        for length in (64, 255):
            batch = task.sample(8, length, generator=gen(length), **params)
            assert batch.inputs.shape == (8, length)
            for b in range(8):
                ids = full_ids(batch, b)
                distance = batch.mask[b].nonzero()[0].item()  # the copy's first byte is not scored
                copied = length + 1 - distance
                assert ids[distance:] == ids[:copied]  # the second copy repeats the chunk's start
                check_scored(batch, b, {t: ids[t + 1] for t in range(distance, length)})
                # The chunk (c2 or c2 + 1 bytes) and the gap (none to `gap` of the sequence) fill
                # the distance: distance - c2 = the gap, plus one for a chunk of c2 + 1.
                assert 0 <= distance - copied <= round(gap * (length + 1)) + 1
                assert bytes(min(i, 255) for i in ids[:copied]) in stream  # real text (<eos> as 0xFF)


def test_repeated_text_copy_distance_varies_within_a_length() -> None:
    task = build_task("repeated_text", gap=0.5)
    batch = task.sample(200, 127, generator=gen(0))
    distances = batch.mask.int().argmax(dim=1)  # the first scored target
    assert distances.min() == 64 and 90 <= distances.max() <= 96  # 128 bytes: 1/2 to 3/4 of them
    fixed = build_task("repeated_text", gap=0.0).sample(20, 127, generator=gen(0))
    assert fixed.mask.int().argmax(dim=1).eq(64).all()


def test_repeated_text_metrics_report_the_copy_loss() -> None:
    task = build_task("repeated_text")
    batch = task.sample(4, 64, generator=gen(0))
    logits = torch.randn(4, 64, task.n_outputs, generator=gen(1))
    result = task.metrics(logits, batch)
    expected = F.cross_entropy(logits[batch.mask], batch.targets[batch.mask]).item()
    assert result["loss"] == pytest.approx(expected)
    assert result["accuracy"] == pytest.approx(100 - result["error"])


def test_repeated_text_scores_the_same_bytes_read_the_first_time() -> None:
    task = build_task("repeated_text", gap=0.5)
    batch = task.sample(6, 95, generator=gen(2))
    distances = batch.mask.int().argmax(dim=1).tolist()
    # A copier: right wherever the byte seen one distance back repeats (the second copy), and a
    # fixed wrong guess elsewhere; the first reading of the copied bytes is at p - d, naively.
    logits = torch.zeros(6, 95, task.n_outputs)
    logits[..., 256] = 1.0  # <eos> never occurs inside a chunk
    first_right = first_total = 0
    for b, d in enumerate(distances):
        for p in range(95):
            if batch.mask[b, p]:
                logits[b, p, batch.targets[b, p]] = 2.0
                assert batch.targets[b, p - d] == batch.targets[b, p]  # the same byte, read before
                first_total += 1
                if p - d in (3, 7):  # the model knows two bytes of the chunk without copying
                    logits[b, p - d, batch.targets[b, p - d]] = 2.0
                    first_right += 1
    result = task.metrics(logits, batch)
    assert result["accuracy"] == 100.0
    assert result["first_accuracy"] == pytest.approx(100.0 * first_right / first_total)
    assert result["copy_gain"] == pytest.approx(100.0 - result["first_accuracy"])
    first = torch.zeros_like(batch.mask)
    for b, d in enumerate(distances):
        first[b, : 95 - d] = True
    expected = F.cross_entropy(logits[first], batch.targets[first]).item()
    assert result["first_loss"] == pytest.approx(expected) and result["first_loss"] > result["loss"]


def test_probe_results_hold_every_length_and_depth() -> None:
    from poslab.lab.config import EvalConfig
    from poslab.lab.evaluate import evaluate
    from poslab.model import ModelConfig, build_model

    task = build_task("passkey", eval_lengths=(96, 192), eval_depths=(0.0, 1.0))
    model = build_model(
        ModelConfig(vocab_size=task.vocab_size, d_model=16, n_layers=1, n_heads=2, encoding="rope")
    )
    result = evaluate(model, task, EvalConfig(batches=1, batch_size=2), train_len=96)
    assert set(result["lengths"]) == {"by_length", "depth_0", "depth_100"}
    for split in ("by_length", "depth_0", "depth_100"):
        cells = result["lengths"][split]
        assert set(cells) == {"96", "192"}
        assert set(cells["96"]) >= {"accuracy", "key_accuracy", "error"}
    assert set(result["splits"]) == {"id", "by_length", "depth_0", "depth_100"}


# -- shapes, seeds, splits -------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL + PROBES + CHOMSKY)
def test_shapes_dtypes_and_ranges(name: str) -> None:
    task = build_task(name)
    batch = task.sample(8, length_for(task, name), generator=gen(0))
    assert batch.inputs.dtype == batch.targets.dtype == torch.long
    assert batch.mask.dtype == torch.bool
    assert batch.inputs.shape == batch.targets.shape == batch.mask.shape
    assert batch.inputs.shape[0] == 8
    assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab_size
    assert batch.targets.min() >= 0 and batch.targets.max() < task.n_outputs
    assert batch.mask.any(dim=1).all()
    if task.causal:
        assert task.n_outputs == task.vocab_size
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])  # shifted by one
    assert task.chance == CHANCE.get(name, 50.0)


@pytest.mark.parametrize("name", CAUSAL + PROBES + CHOMSKY)
def test_seed_determines_the_batch(name: str) -> None:
    task = build_task(name)
    length = length_for(task, name)
    a, b = (task.sample(8, length, generator=gen(7)) for _ in range(2))
    c = task.sample(8, length, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(vars(a).values(), vars(b).values(), strict=True))
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", CAUSAL + PROBES + CHOMSKY)
def test_every_split_samples(name: str) -> None:
    task = build_task(name)
    splits = task.splits()
    assert "id" in splits
    for params in splits.values():
        # Chomsky splits carry their lengths (the ood range is long: a length of 60 suffices).
        length = min(params["lengths"][-1], 60) if "lengths" in params else length_for(task, name)
        assert task.sample(2, length, generator=gen(0), **params).mask.any()


def test_chomsky_splits_are_the_protocol_lengths() -> None:
    task = build_task("parity_check", max_eval_len=100)
    assert task.splits() == {"id": {"lengths": range(1, 41)}, "ood": {"lengths": range(41, 101)}}
    with pytest.raises(ValueError, match="outside"):
        task.sample(2, 41, generator=gen(0), **task.splits()["id"])


def test_flipflop_instruction_frequencies() -> None:
    task = build_task("flipflop")
    for split, p in (("id", 0.8), ("ood_sparse", 0.98), ("ood_dense", 0.1)):
        batch = task.sample(256, 256, generator=gen(0), **task.splits()[split])
        instructions = batch.inputs[:, 2:-1:2]  # all but the first (w) and the last (r)
        freq = [(instructions == k).float().mean().item() for k in range(3)]  # w, r, i
        assert freq[2] == pytest.approx(p, abs=0.01)
        assert freq[0] == pytest.approx((1 - p) / 2, abs=0.01)
        assert freq[1] == pytest.approx((1 - p) / 2, abs=0.01)
        assert batch.inputs[:, 0].eq(0).all() and batch.inputs[:, -1].eq(1).all()
        seq = torch.cat([batch.inputs[:, :1], batch.targets], dim=1)
        free_bits = seq[:, 1::2][seq[:, 0::2] != 1]  # bits after w and i
        assert (free_bits == 4).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_selective_copy_blank_ratio_and_slots() -> None:
    task = build_task("selective_copy", n_blanks=64)
    counts = {}
    for split, params in task.splits().items():
        batch = task.sample(4, 16, generator=gen(0), **params)
        counts[split] = batch.inputs.eq(0).sum(dim=1).unique().tolist()
    assert counts == {"id": [64], "ood_dense": [32], "ood_sparse": [128]}
    # Content lands on every slot of the scattered region with about the same frequency.
    batch = task.sample(4000, 16, generator=gen(1))
    occupied = batch.inputs[:, :80].ne(0).float().mean(dim=0)
    assert occupied.sub(16 / 80).abs().max().item() < 0.03


def test_counting_statement_weights_and_answers() -> None:
    task = build_task("counting", n_vars=3)
    batch = task.sample(500, 40, generator=gen(0))
    words = [full_sequence(task, batch, b) for b in range(500)]
    n_pass = sum(seq.count("pass;") for seq in words)
    n_statements = sum(count_statements(seq) for seq in words)
    # pass has weight 50 of 58, and more while no variable is set (increments are then redrawn).
    assert 50 / 58 - 0.03 < n_pass / n_statements < 50 / 51
    answers = batch.targets[batch.mask]
    assert len(answers.unique()) >= 4


def test_counting_values_saturate_at_ten() -> None:
    task = build_task("counting", n_vars=1)
    batch = task.sample(64, 200, generator=gen(0))
    check_causal(task, batch)  # the interpreter asserts that no value passes 10
    assert (batch.targets[batch.mask] == task.tokens.index("10")).any()


def test_counting_shortest_programs_have_three_statements() -> None:
    task = build_task("counting", n_vars=1)
    batch = task.sample(16, 3, generator=gen(0))
    assert all(count_statements(full_sequence(task, batch, b)) == 3 for b in range(16))


# -- metrics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL + PROBES + CHOMSKY)
def test_metrics_perfect_and_corrupted(name: str) -> None:
    task = build_task(name)
    batch = task.sample(16, length_for(task, name), generator=gen(0))
    logits = F.one_hot(batch.targets, task.n_outputs).float()
    perfect = task.metrics(logits, batch)
    assert perfect["error"] == 0.0 and perfect["seq_error"] == 0.0
    if "accuracy" in perfect:
        assert perfect["accuracy"] == 100.0

    # Corrupt the first scored token of rows 0, 2, 4, 6.
    rows = [0, 2, 4, 6]
    for b in rows:
        t = batch.mask[b].nonzero()[0].item()
        logits[b, t] = F.one_hot((batch.targets[b, t] + 1) % task.n_outputs, task.n_outputs).float()
    bad = task.metrics(logits, batch)
    n_scored = batch.mask.sum().item()
    assert bad["error"] == pytest.approx(100 * len(rows) / n_scored)
    assert bad["seq_error"] == pytest.approx(100 * len(rows) / 16)
    if "accuracy" in bad:  # pooled over the batch's scored tokens, as DeepMind's code
        assert bad["accuracy"] == pytest.approx(100 * (1 - len(rows) / n_scored))


def test_seq_error_counts_only_rows_with_scored_tokens() -> None:
    task = build_task("flipflop")
    targets = torch.full((4, 3), 3)
    mask = torch.tensor([[True, False, True], [False] * 3, [False, True, False], [False] * 3])
    batch = Batch(torch.zeros(4, 3, dtype=torch.long), targets, mask)
    logits = F.one_hot(targets, 5).float()
    logits[0, 2] = F.one_hot(torch.tensor(4), 5).float()  # one wrong token in row 0
    assert task.metrics(logits, batch) == {"error": pytest.approx(100 / 3), "seq_error": 50.0}
    nothing = Batch(batch.inputs, targets, torch.zeros(4, 3, dtype=torch.bool))
    assert all(math.isnan(v) for v in task.metrics(logits, nothing).values())


def test_metrics_ignore_unscored_positions_and_check_shapes() -> None:
    task = build_task("flipflop")
    batch = task.sample(4, 32, generator=gen(0))
    logits = F.one_hot(batch.targets, 5).float()
    logits[~batch.mask] = F.one_hot(torch.tensor(0), 5).float()  # wrong where not scored
    assert task.metrics(logits, batch)["error"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        task.metrics(logits[..., :4], batch)


# -- user errors -----------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="nope") as info:
        build_task("nope")
    assert all(name in str(info.value) for name in CAUSAL + CHOMSKY)


def test_unknown_option_is_named() -> None:
    with pytest.raises(ValueError, match="q.*accepted: p, p_sparse, p_dense"):
        build_task("flipflop", q=0.5)


@pytest.mark.parametrize(
    ("name", "options", "shown"),
    [
        ("flipflop", {"p": 1.5}, "1.5"),
        ("flipflop", {"p_dense": -0.1}, "-0.1"),
        ("counting", {"n_vars": 0}, "n_vars.*0"),
        ("counting", {"n_vars": -3}, "-3"),
        ("selective_copy", {"n_blanks": -1}, "n_blanks.*-1"),
        ("selective_copy", {"n_symbols": 0}, "n_symbols.*0"),
        ("parity_check", {"max_train_len": 40, "max_eval_len": 30}, "max_eval_len.*30"),
        ("bucket_sort", {"max_train_len": 0}, "max_train_len.*0"),
    ],
)
def test_bad_option_values_are_named(name: str, options: dict, shown: str) -> None:
    with pytest.raises(ValueError, match=shown):
        build_task(name, **options)


def test_bad_sample_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="length.*0"):
        build_task("reverse_string").sample(2, 0, generator=gen(0))
    with pytest.raises(ValueError, match="p.*2"):
        build_task("flipflop").sample(2, 8, generator=gen(0), p=2.0)
    with pytest.raises(ValueError, match="length.*2.*1"):
        build_task("flipflop").sample(2, 1, generator=gen(0))
    with pytest.raises(ValueError, match="length.*2"):
        build_task("counting").sample(2, 2, generator=gen(0))
    with pytest.raises(ValueError, match="batch_size.*0"):
        build_task("selective_copy").sample(0, 8, generator=gen(0))


def test_decode_names_tokens() -> None:
    task = build_task("flipflop")
    assert task.decode(torch.tensor([0, 4, 2, 3, 1])) == "w 1 i 0 r"
    assert build_task("stack_manipulation").decode_outputs([1, 0, 2]) == "1 0 END"
    with pytest.raises(ValueError, match="1-D"):
        task.decode(torch.zeros(2, 3, dtype=torch.long))


# -- speed -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CAUSAL + PROBES + CHOMSKY)
def test_sampling_is_fast(name: str) -> None:
    task = build_task(name)
    length = {"flipflop": 256}.get(name, CAUSAL_LENGTH.get(name, 40))
    g = gen(0)
    task.sample(32, length, generator=g)
    start = time.perf_counter()
    for _ in range(5):
        task.sample(32, length, generator=g)
    assert (time.perf_counter() - start) / 5 < 0.05


def test_every_task_declares_its_headline_and_split_lengths():
    for name in TASKS.names():
        if name == "lm":
            continue  # needs a corpus; covered by tests/test_extrapolate.py
        task = build_task(name)
        assert task.headline in ("error", "accuracy"), name
        for split, params in task.splits().items():
            lengths = task.split_lengths(split)
            assert (lengths is None) == ("lengths" not in params), (name, split)
    assert build_task("reverse_string").headline == "accuracy"
    assert build_task("flipflop").headline == "error"
