"""The papers' tables as poslab reproduces them: which encodings, which presets, the published numbers.

A `PaperTable` is data: its rows (the paper's name for an encoding and poslab's spec), its parts
(one grid each: a CPU-scaled preset and the paper-scale twin, with overrides, e.g. counting with 1, 3
and 5 variables), the splits it shows and the paper's numbers for them. `poslab reproduce NAME`
(`poslab.lab.experiments.reproduce`) trains every part's grid and writes the page. Every table has a
row beyond the paper's, since CoPE and DAPE were never compared on each other's tasks: DAPE-Kerple
in the CoPE paper's tables, CoPE in the DAPE paper's.

The numbers are the papers' own: CoPE, Golovneva et al. 2024 (arXiv 2405.18719), tables 1-3 (test
error %, lower is better), tables 4-5 and the Wikitext-103 length generalisation (perplexity). The
DAPE paper's Chomsky-hierarchy table (arXiv 2405.14722) has none here yet: see `dape_chomsky`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from poslab.lab.tasks.chomsky import chomsky_tasks
from poslab.registry import Registry

DAPE_KERPLE = ("DAPE-Kerple (not in the paper)", "dape[base=kerple_log]")


@dataclass(frozen=True, kw_only=True)
class Part:
    """One grid of a table: ``name`` labels its columns and names its folder; ``cpu`` and ``paper``
    are the presets of the two scales, ``overrides`` apply to both; ``splits`` are the evaluation
    splits shown, in the paper's column order: a split's summary (``"validation"``) or the split at
    one evaluated length (``"validation@320"``, results.json's ``metrics["lengths"]``)."""

    name: str
    cpu: str
    paper: str
    overrides: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("id",)


@dataclass(frozen=True, kw_only=True)
class PaperTable:
    """A table of a paper. ``rows``: (the paper's row name, poslab encoding spec); ``numbers``: the
    paper's value per row name and column ``"<part>/<split>"`` (missing: the paper has none);
    ``metric``: the headline metric of the runs ('error' or 'accuracy', in %, or 'ppl');
    ``ratio``: two columns (numerator, denominator) whose ratio the page adds per row, e.g.
    perplexity at 2.5 times the training length over perplexity at it; ``best``: the page shows
    each cell's best seed beside the mean (the Chomsky-hierarchy papers report the best of their
    runs), one line per column with its task's level and chance, one column per row; ``plot``:
    length-range splits (e.g. ``("id", "ood")``) whose per-length metric the page draws, one figure
    per part with a line per row (the mean over seeds); ``learned``: for a table with best seeds, a
    split (``"id"``, the training lengths) whose mean over seeds the page shows in a second table of
    the same shape, to tell a model that never learned a task from one that learned it but did not
    extrapolate."""

    name: str
    title: str
    source: str
    metric: str
    rows: tuple[tuple[str, str], ...]
    parts: tuple[Part, ...]
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_setting: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    ratio: tuple[str, str] | None = None
    best: bool = False
    plot: tuple[str, ...] = ()
    learned: str | None = None

    def __post_init__(self) -> None:
        names = [row for row, _ in self.rows]
        unknown = set(self.numbers) - set(names)
        if unknown:
            raise ValueError(f"table {self.name}: numbers for rows it does not have: {sorted(unknown)}")
        columns = {f"{part.name}/{split}" for part in self.parts for split in part.splits}
        for row, values in self.numbers.items():
            if set(values) - columns:
                raise ValueError(
                    f"table {self.name}, row {row}: unknown columns {sorted(set(values) - columns)}"
                )
        if self.ratio is not None and (len(self.ratio) != 2 or set(self.ratio) - columns):
            raise ValueError(f"table {self.name}: ratio must be two of its columns, got {self.ratio!r}")
        for part in self.parts:
            for split in part.splits:
                split_at(split)  # a bad length raises here, not after training
        if self.best and self.ratio is not None:
            raise ValueError(f"table {self.name}: a table with best seeds has no ratio column")
        for split in self.plot:
            if split_at(split)[1] is not None:
                raise ValueError(f"table {self.name}: plot names whole splits, got {split!r}")
        if self.learned is not None and (not self.best or split_at(self.learned)[1] is not None):
            raise ValueError(
                f"table {self.name}: learned names a whole split of a table with best seeds, "
                f"got {self.learned!r}"
            )

    @property
    def columns(self) -> list[str]:
        """``"<part>/<split>"`` for every part and split, in order."""
        return [f"{part.name}/{split}" for part in self.parts for split in part.splits]


def split_at(split: str) -> tuple[str, int | None]:
    """``"validation@320"`` -> ("validation", 320); ``"validation"`` -> ("validation", None)."""
    name, at, length = split.partition("@")
    if not at:
        return name, None
    if not length.isdigit() or int(length) < 1:
        raise ValueError(f"column split {split!r}: the length after '@' must be a positive integer")
    return name, int(length)


TABLES: Registry[PaperTable] = Registry("table", "tables")


def _register(table: PaperTable) -> PaperTable:
    return TABLES.add(table.name, table)


def get_table(name: str) -> PaperTable:
    """The table called ``name``; ValueError naming the known ones otherwise."""
    return TABLES.lookup(name)


_register(
    PaperTable(
        name="cope_flipflop",
        title="Flip-flop language modelling: error on the read bits",
        source="CoPE paper (arXiv 2405.18719), table 1",
        metric="error",
        rows=(("Absolute", "learned"), ("RoPE", "rope"), ("CoPE", "cope"), DAPE_KERPLE),
        parts=(
            Part(
                name="flipflop",
                cpu="flipflop_demo",
                paper="flipflop_paper",
                splits=("id", "ood_sparse", "ood_dense"),
            ),
        ),
        numbers={
            "Absolute": {"flipflop/id": 6.8, "flipflop/ood_sparse": 21.7},
            "RoPE": {"flipflop/id": 1.8, "flipflop/ood_sparse": 20.3},
            "CoPE": {"flipflop/id": 0.0, "flipflop/ood_sparse": 4.9},
        },
        paper_setting="4 layers, d 256, 256 pairs, OOD = FFL(0.98); the paper has no dense split",
    )
)

_register(
    PaperTable(
        name="cope_selective_copy",
        title="Selective copy: error on the copied tokens",
        source="CoPE paper (arXiv 2405.18719), table 2",
        metric="error",
        rows=(("Absolute", "learned"), ("RoPE", "rope"), ("CoPE", "cope"), DAPE_KERPLE),
        parts=(
            Part(
                name="selective_copy",
                cpu="selective_copy_small",
                paper="selective_copy_paper",
                splits=("id", "ood_dense", "ood_sparse"),
            ),
        ),
        numbers={
            "Absolute": {
                "selective_copy/id": 16.9,
                "selective_copy/ood_dense": 25.6,
                "selective_copy/ood_sparse": 85.2,
            },
            "RoPE": {
                "selective_copy/id": 40.1,
                "selective_copy/ood_dense": 100.0,
                "selective_copy/ood_sparse": 100.0,
            },
            "CoPE": {
                "selective_copy/id": 0.0,
                "selective_copy/ood_dense": 0.0,
                "selective_copy/ood_sparse": 0.0,
            },
        },
        paper_setting="4 layers, d 256, 128 content tokens; blanks ID : dense : sparse = 2 : 1 : 4",
    )
)


def _counting_part(n_vars: int) -> Part:
    label = f"{n_vars}var" if n_vars == 1 else f"{n_vars}vars"
    return Part(
        name=label, cpu="counting_small", paper="counting_paper", overrides=(f"task.options.n_vars={n_vars}",)
    )


_register(
    PaperTable(
        name="cope_counting",
        title="Counting: error on the printed variable's value",
        source="CoPE paper (arXiv 2405.18719), table 3",
        metric="error",
        rows=(("Absolute", "learned"), ("Relative", "relative"), ("CoPE", "cope"), DAPE_KERPLE),
        parts=tuple(_counting_part(n) for n in (1, 3, 5)),
        numbers={
            "Absolute": {"1var/id": 5.3, "3vars/id": 67.6, "5vars/id": 71.5},
            "Relative": {"1var/id": 1.1, "3vars/id": 17.8, "5vars/id": 22.4},
            "CoPE": {"1var/id": 0.0, "3vars/id": 1.2, "5vars/id": 7.4},
        },
        paper_setting="4 layers, d 256, 4 heads, post-LN, 10k training programs of up to 512 statements",
    )
)

# The language-model tables score perplexity on held-out documents at the training length
# (`lm_stdlib_small`'s 2-layer d-128 model, 600 steps at 128 tokens); the paper trained a 20M-parameter
# code model and a GPT-2-small-sized Wikitext-103 model at 1024 tokens.
_LM_TEST = ("eval.splits=validation,test",)
_PROSE = ("task.options.corpus=python_docs", "task.options.tokenizer=bpe")

_register(
    PaperTable(
        name="cope_code_lm",
        title="Code language modelling: perplexity at the training length",
        source="CoPE paper (arXiv 2405.18719), table 5 (code)",
        metric="ppl",
        rows=(
            ("Absolute", "learned"),
            ("RoPE", "rope"),
            ("CoPE", "cope"),
            ("CoPE+RoPE", "cope+rope"),
            DAPE_KERPLE,
        ),
        parts=(
            Part(
                name="stdlib",
                cpu="lm_stdlib_small",
                paper="lm_paper_128",
                overrides=_LM_TEST,
                splits=("validation", "test"),
            ),
        ),
        numbers={
            "Absolute": {"stdlib/test": 4.7},
            "RoPE": {"stdlib/test": 4.1},
            "CoPE": {"stdlib/test": 3.9},
            "CoPE+RoPE": {"stdlib/test": 4.0},
        },
        paper_setting="a 20M-parameter decoder on a code corpus at 1024 tokens (test perplexity); here the "
        "bytes of the running Python's standard library at 128 tokens",
    )
)

_register(
    PaperTable(
        name="cope_text_lm",
        title="Text language modelling: perplexity at the training length",
        source="CoPE paper (arXiv 2405.18719), table 4 (Wikitext-103)",
        metric="ppl",
        rows=(
            ("Absolute", "learned"),
            ("Relative", "relative"),
            ("CoPE", "cope"),
            ("CoPE+Relative", "cope+relative"),
            DAPE_KERPLE,
        ),
        parts=(
            Part(
                name="python_docs",
                cpu="lm_stdlib_small",
                paper="lm_paper_128",
                overrides=(*_PROSE, *_LM_TEST),
                splits=("validation", "test"),
            ),
        ),
        numbers={
            "Absolute": {"python_docs/validation": 23.96, "python_docs/test": 24.87},
            "Relative": {"python_docs/validation": 22.90, "python_docs/test": 23.81},
            "CoPE": {"python_docs/validation": 22.55, "python_docs/test": 23.46},
            "CoPE+Relative": {"python_docs/validation": 22.31, "python_docs/test": 23.23},
        },
        paper_setting="GPT-2 small size on Wikitext-103 at 1024 tokens (val / test perplexity); here the "
        "Python documentation's reST sources (Debian python3.11-doc) in 4096 BPE tokens at 128 tokens",
    )
)

# Length generalisation: trained at 128 tokens, validation perplexity at 128 and at 320 (2.5x, the
# paper's 1024 -> 2560). `LMTask`'s eval_lengths scores both lengths in the run's own evaluation:
# each window of 320 tokens is read whole (full causal context, no 128-token sliding windows) and its
# perplexity is over all its tokens, not the last 256 (the paper's plain perplexity), averaged over
# the eval batches as in the tables above. Every run sees the same windows at a length; the two
# lengths read different random windows of the held-out documents.
_register(
    PaperTable(
        name="cope_length_generalisation",
        title="Text language modelling: perplexity at the training length and at 2.5 times it",
        source="CoPE paper (arXiv 2405.18719), Wikitext-103 length generalisation",
        metric="ppl",
        rows=(
            ("Relative", "relative"),
            ("CoPE", "cope"),
            ("CoPE+Relative", "cope+relative"),
            DAPE_KERPLE,
        ),
        parts=(
            Part(
                name="python_docs",
                cpu="lm_stdlib_small",
                paper="lm_paper_128",
                overrides=(
                    *_PROSE,
                    "task.options.eval_lengths=128,320",
                    "eval.splits=validation",
                    "eval.batches=8",
                ),
                splits=("validation@128", "validation@320"),
            ),
        ),
        numbers={
            "Relative": {"python_docs/validation@128": 22.90, "python_docs/validation@320": 24.2},
            "CoPE": {"python_docs/validation@128": 22.55, "python_docs/validation@320": 21.6},
            "CoPE+Relative": {"python_docs/validation@128": 22.31},
        },
        ratio=("python_docs/validation@320", "python_docs/validation@128"),
        paper_setting="GPT-2 small size on Wikitext-103 trained at 1024 tokens, validation perplexity at "
        "1024 (table 4) and at 2560 (2.5x; ~24.2 and ~21.6 are read from the paper's text and figure, "
        "approximate); here the Python documentation's reST sources in 4096 BPE tokens, trained at 128 "
        "and scored at 128 and 320 over all tokens of each window",
    )
)

# The Chomsky hierarchy (Deletang et al., arXiv 2207.02098) as the DAPE paper runs it, after Ruoss et
# al. (arXiv 2305.16843): a bidirectional encoder trained on lengths 1-40, per-token accuracy pooled
# over each batch's output tokens and averaged over the unseen lengths (the `ood` split). One part per
# registered task, in docs/tasks.md's order: regular, context-free, context-sensitive. The page takes
# each task's level and chance (guessing among its output symbols) from the task itself.
CHOMSKY_TASKS = tuple(chomsky_tasks())

# No published numbers yet: the DAPE repository (chuanyang-Zheng/DAPE, README and configs) has the
# language-model runs only, no Chomsky-hierarchy code or results, and the copies of the paper's
# pages that could be searched (arXiv HTML of v1, summaries) gave its opening, not the table.
# Numbers are never typed in from memory: add them with the table's number and the paper's version.
_register(
    PaperTable(
        name="dape_chomsky",
        title="The Chomsky hierarchy: per-token accuracy at unseen lengths",
        source="DAPE paper (arXiv 2405.14722), the Chomsky-hierarchy table",
        metric="accuracy",
        rows=(
            ("NoPE", "nope"),
            ("RoPE", "rope"),
            ("ALiBi", "alibi"),
            ("Kerple", "kerple_log"),
            ("FIRE", "fire"),
            ("DAPE-Kerple", "dape[base=kerple_log]"),
            ("DAPE-FIRE", "dape[base=fire]"),
            ("CoPE (not in the paper)", "cope"),
        ),
        parts=tuple(
            Part(
                name=task,
                cpu="chomsky_cpu",
                paper="chomsky_paper",
                overrides=(f"task.name={task}",),
                splits=("ood",),
            )
            for task in CHOMSKY_TASKS
        ),
        best=True,
        plot=("id", "ood"),
        learned="id",
        paper_setting="a 5-layer encoder, d 256, 8 heads (about 4M parameters), batch 128, lr 1e-4, trained "
        "on lengths 1-40 and tested on every length 41-500 (`chomsky_paper`); here 2 layers, d 64, 4 heads "
        "(about 0.1M parameters), 2000 steps of batch 32 (1% of the sequences of 50k steps of batch 128), "
        "tested on every 6th length 41-100 (2.5 times the longest training length, not 12.5): "
        "`chomsky_cpu` has the sizing, about 100 CPU seconds a run",
    )
)
