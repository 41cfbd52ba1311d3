"""The tasks against the reference implementations that produced the papers' numbers.

- Flip-flop: Liu et al.'s definition (arXiv 2306.00946): the first instruction writes, the last
  reads, the ones in between are i.i.d. (ignore with probability p, write or read otherwise).
- Chomsky tasks: DeepMind's code (google-deepmind/neural_networks_chomsky_hierarchy and
  google-deepmind/randomized_positional_encodings): task keys, input and output sizes, output
  lengths, odds_first's order and the per-token accuracy pooled over a batch.
- Counting: the official CoPE run (facebookresearch/RAM, projects/cope): programs of up to 512
  statements whose last 512 tokens are kept.

Each expectation below is restated from the reference's code or paper, not computed by poslab.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from poslab.lab.presets import get_preset
from poslab.lab.tasks import TASKS, Batch, build_task
from poslab.lab.tasks.chomsky import DEEPMIND_NAMES, ChomskyTask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequence(task, batch: Batch, b: int) -> list[str]:
    """A causal task's token sequence: the first input, then every target."""
    return task.decode(torch.cat([batch.inputs[b, :1], batch.targets[b]])).split(" ")


# -- flip-flop -------------------------------------------------------------------------------------


def read_answers(words: list[str]) -> dict[int, str]:
    """Target index -> the bit each read must return: the bit of the latest write before it."""
    answers, memory = {}, None
    for k, instruction in enumerate(words[0::2]):
        if instruction == "w":
            memory = words[2 * k + 1]
        elif instruction == "r":
            assert memory is not None, "a read before any write"
            answers[2 * k] = memory  # the bit after instruction k is the target at index 2k
    return answers


@pytest.mark.parametrize(("split", "p"), [("id", 0.8), ("ood_sparse", 0.98), ("ood_dense", 0.1)])
def test_flipflop_sequences_open_with_a_write_and_close_with_a_read(split: str, p: float) -> None:
    task = build_task("flipflop")
    assert task.splits()[split] == {"p": p}
    for length, seed in ((256, 0), (2, 1), (3, 2), (17, 3)):
        batch = task.sample(256, length, generator=gen(seed), **task.splits()[split])
        assert batch.inputs.shape == (256, 2 * length - 1)
        for b in range(256):
            words = sequence(task, batch, b)
            assert len(words) == 2 * length
            assert words[0] == "w" and words[-2] == "r" and words[-1] in ("0", "1")
            answers = read_answers(words)
            assert batch.mask[b].nonzero().flatten().tolist() == sorted(answers)
            assert [words[t + 1] for t in sorted(answers)] == list(answers.values())
            assert batch.mask[b, -1]  # the final read is scored


@pytest.mark.parametrize(("split", "p"), [("id", 0.8), ("ood_sparse", 0.98), ("ood_dense", 0.1)])
def test_flipflop_middle_instructions_are_iid_with_probability_p(split: str, p: float) -> None:
    task = build_task("flipflop")
    batch = task.sample(512, 256, generator=gen(5), **task.splits()[split])
    middle = batch.inputs[:, 2:-1:2]  # instructions 1 .. 254 of 0 .. 255
    assert middle.shape == (512, 254)
    n = middle.numel()
    for token, expected in (("i", p), ("w", (1 - p) / 2), ("r", (1 - p) / 2)):
        freq = middle.eq(task.tokens.index(token)).sum().item() / n
        # 130k draws: a standard deviation of at most 0.0014, so 0.01 is about 7 of them.
        assert freq == pytest.approx(expected, abs=0.01), token
    # Independence across positions: the instruction frequencies do not drift along the sequence.
    first, second = middle[:, :127], middle[:, 127:]
    ignore = task.tokens.index("i")
    assert first.eq(ignore).float().mean().item() == pytest.approx(
        second.eq(ignore).float().mean().item(), abs=0.01
    )


def test_flipflop_needs_two_pairs() -> None:
    with pytest.raises(ValueError, match="length must be an integer >= 2, got 1"):
        build_task("flipflop").sample(4, 1, generator=gen(0))


# -- Chomsky tasks ---------------------------------------------------------------------------------

# DeepMind's code, experiments/constants.py and each task's class: key -> (level, input_size,
# output_size, output length at input lengths 1..8); their level "dcf" is "context_free" here.
# input_size excludes the placeholder (their "empty output" token, one more one-hot slot that the
# model wrapper adds).
REFERENCE = {
    "even_pairs": ("regular", 2, 2, [1] * 8),
    "modular_arithmetic": ("regular", 9, 5, [1] * 8),
    "parity_check": ("regular", 2, 2, [1] * 8),
    "cycle_navigation": ("regular", 3, 5, [1] * 8),
    "stack_manipulation": ("context_free", 5, 3, [n + 1 for n in range(1, 9)]),
    "reverse_string": ("context_free", 2, 2, list(range(1, 9))),
    "modular_arithmetic_brackets": ("context_free", 11, 5, [1] * 8),
    "solve_equation": ("context_free", 11, 5, [1] * 8),
    "duplicate_string": ("context_sensitive", 2, 2, [2 * n for n in range(1, 9)]),
    "missing_duplicate_string": ("context_sensitive", 4, 2, [1] * 8),
    "odds_first": ("context_sensitive", 2, 2, list(range(1, 9))),
    "binary_addition": ("context_sensitive", 3, 3, [n + 1 for n in range(1, 9)]),
    "binary_multiplication": ("context_sensitive", 3, 3, list(range(1, 9))),
    "compute_sqrt": ("context_sensitive", 2, 2, [(n + 1) // 2 for n in range(1, 9)]),
    "bucket_sort": ("context_sensitive", 5, 5, list(range(1, 9))),
}
# Input slots of DeepMind's code that never occur (documented in poslab.lab.tasks.chomsky).
UNUSED_REFERENCE_SLOTS = {"modular_arithmetic": 1, "modular_arithmetic_brackets": 1}


def chomsky_names() -> list[str]:
    return [name for name, cls in TASKS.items() if issubclass(cls, ChomskyTask)]


def test_every_chomsky_task_maps_to_one_deepmind_task() -> None:
    names = chomsky_names()
    mapped = [DEEPMIND_NAMES.get(n, n) for n in names]
    assert sorted(mapped) == sorted(REFERENCE)
    assert set(DEEPMIND_NAMES) <= set(names)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_chomsky_sizes_and_output_lengths_match_deepmind(name: str) -> None:
    ours = {DEEPMIND_NAMES.get(n, n): n for n in chomsky_names()}[name]
    task = build_task(ours)
    level, input_size, output_size, output_lengths = REFERENCE[name]
    assert task.level == level
    assert len(task.input_alphabet) == input_size - UNUSED_REFERENCE_SLOTS.get(name, 0)
    assert task.vocab_size == len(task.input_alphabet) + 1  # the placeholder
    assert task.n_outputs == output_size
    assert [task.output_length(n) for n in range(1, 9)] == output_lengths
    if task.has_end_token:  # the end token is the last output id, as their output_size - 1
        assert task.output_tokens.index("END") == output_size - 1


def odds_first_reference(bits: list[str]) -> list[str]:
    """DeepMind's code: the symbols at odd 0-based indices (s_2, s_4, .. in 1-based terms), then the
    symbols at even 0-based indices."""
    odd = [bits[i] for i in range(len(bits)) if i % 2 == 1]
    even = [bits[i] for i in range(len(bits)) if i % 2 == 0]
    return odd + even


def test_odds_first_follows_deepmind_code_order() -> None:
    assert "".join(odds_first_reference(list("00110101"))) == "01110100"  # not the docstring's 01000111
    task = build_task("odds_first")
    for seed, length in enumerate((1, 2, 3, 8, 41, 100)):
        batch = task.sample(16, length, generator=gen(seed))
        for b in range(16):
            bits = task.decode(batch.inputs[b, :length]).split(" ")
            got = task.decode_outputs(batch.targets[b, length:]).split(" ")
            assert got == odds_first_reference(bits)


def test_accuracy_is_pooled_over_the_batch_output_tokens() -> None:
    task = build_task("binary_addition")
    # Two rows of 2 inputs + 4 outputs: row 0 scores 1 output token (wrong), row 1 scores 4 (right).
    inputs = torch.tensor([[0, 0, 3, 3, 3, 3], [1, 1, 3, 3, 3, 3]])
    targets = torch.tensor([[0, 0, 2, 0, 0, 0], [0, 0, 1, 0, 1, 2]])
    mask = torch.tensor([[False, False, True, False, False, False], [False, False, True, True, True, True]])
    batch = Batch(inputs, targets, mask)
    logits = F.one_hot(targets, task.n_outputs).float()
    logits[0, 2] = F.one_hot(torch.tensor(0), task.n_outputs).float()
    metrics = task.metrics(logits, batch)
    per_sequence_mean = 100 * (0 / 1 + 4 / 4) / 2
    assert per_sequence_mean == 50.0
    assert metrics["accuracy"] == pytest.approx(100 * 4 / 5)  # DeepMind: sum(mask * correct) / sum(mask)
    assert metrics["accuracy"] == pytest.approx(100 - metrics["error"])


@pytest.mark.parametrize("name", ["stack_manipulation", "binary_addition", "binary_multiplication"])
def test_accuracy_pools_random_predictions_on_end_token_tasks(name: str) -> None:
    task = build_task(name)
    batch = task.sample(64, 20, generator=gen(1))
    logits = torch.randn(*batch.targets.shape, task.n_outputs, generator=gen(2))
    correct = (logits.argmax(-1) == batch.targets) & batch.mask
    assert batch.mask.sum(dim=1).unique().numel() > 1  # the rows' output lengths differ
    expected = 100.0 * correct.sum().item() / batch.mask.sum().item()
    assert task.metrics(logits, batch)["accuracy"] == pytest.approx(expected)


# -- counting --------------------------------------------------------------------------------------


def run_window(words: list[str]) -> tuple[str, int, bool]:
    """Interpret a program suffix ending in ``print x answer``: (x, increments of x since its last
    visible reset, whether that reset is visible). A cut statement at the start is skipped."""
    assert words[-3] == "print"
    var = words[-2]
    i = 0
    while words[i] in ("=", "0", ";", "++;"):  # the tail of a statement cut by the window
        i += 1
    count, reset_seen = 0, False
    while i < len(words) - 3:
        if words[i] == "pass;":
            i += 1
        elif words[i + 1] == "++;":
            count += words[i] == var
            i += 2
        else:
            assert words[i + 1 : i + 4] == ["=", "0", ";"], words[i : i + 4]
            if words[i] == var:
                count, reset_seen = 0, True
            i += 4
    assert i == len(words) - 3
    return var, count, reset_seen


def unpadded(task, batch: Batch, b: int) -> list[str]:
    return [w for w in sequence(task, batch, b) if w != "<pad>"]


def test_counting_keeps_the_last_max_tokens_and_the_whole_program_answer() -> None:
    whole = build_task("counting", n_vars=3)
    cut = build_task("counting", n_vars=3, max_tokens=512)
    full_batch = whole.sample(300, 512, generator=gen(4))
    cut_batch = cut.sample(300, 512, generator=gen(4))  # the same programs: cutting draws nothing
    assert cut_batch.inputs.shape[1] <= 511  # at most 512 tokens, the last one only a target
    n_cut = n_reset_lost = 0
    for b in range(300):
        program, kept = unpadded(whole, full_batch, b), unpadded(cut, cut_batch, b)
        assert kept == program[-512:]
        assert cut_batch.mask[b].nonzero().flatten().tolist() == [len(kept) - 2]  # only the answer
        var, count, reset_seen = run_window(program)
        assert reset_seen and program[-1] == str(count)  # the whole program decides the answer
        var, count, reset_seen = run_window(kept)
        if reset_seen:
            assert kept[-1] == str(count)
        else:  # the reset was cut off: the answer still counts the increments before the window
            assert count <= int(kept[-1]) <= 10
            n_reset_lost += 1
        n_cut += len(program) > 512
    assert 10 <= n_cut < 300  # about 13% of the programs are longer than 512 tokens
    assert n_reset_lost <= n_cut


def test_counting_paper_preset_follows_the_official_run_script() -> None:
    config = get_preset("counting_paper")
    assert config.task.train_len == 512  # --max-steps 512
    assert config.task.options == {"n_vars": 3, "max_tokens": 512}  # --nvars 3, --block-size 512
    assert config.task.train_pool == 10000  # --ntrain 10000
    # run.sh: --emb-tie --drop 0.1 --batch-sz 64 --lr 0.00007 --nepochs 100 --post-norm, and the
    # trainer's defaults: Adam, no lr decay, no warmup, no gradient clipping.
    model, train = config.model, config.train
    assert (model.n_layers, model.d_model, model.n_heads, model.norm) == (4, 256, 4, "post")
    assert model.tie_embeddings and model.dropout == 0.1
    assert (train.batch_size, train.lr, train.weight_decay, train.grad_clip) == (64, 7e-5, 0.0, 0.0)
    assert (train.warmup, train.min_lr_ratio, train.beta2) == (0, 1.0, 0.999)
    assert train.steps == 100 * -(-10000 // 64)  # 100 epochs of 157 batches
    task = config.task.build()
    batch = task.sample(64, config.task.train_len, generator=gen(0))
    assert batch.inputs.shape[1] == 511  # at 512 statements some programs are longer than the block


def test_counting_max_tokens_is_checked() -> None:
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 3, got 2"):
        build_task("counting", max_tokens=2)
