"""The papers' tables as poslab reproduces them: which encodings, which presets, the published numbers.

A `PaperTable` is data: its rows (the paper's name for an encoding and poslab's spec), its parts
(one grid each: a CPU-scaled preset and the paper-scale twin, with overrides, e.g. counting with 1, 3
and 5 variables), the splits it shows and the paper's numbers for them. `poslab reproduce NAME`
(`poslab.experiments.reproduce`) trains every part's grid and writes the page. Every table has a
DAPE-Kerple row beyond the paper's (CoPE and DAPE were never compared on each other's tasks).

The numbers are the papers' own: CoPE, Golovneva et al. 2024 (arXiv 2405.18719), tables 1-3 (test
error %, lower is better).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DAPE_KERPLE = ("DAPE-Kerple (not in the paper)", "dape[base=kerple_log]")


@dataclass(frozen=True, kw_only=True)
class Part:
    """One grid of a table: ``name`` labels its columns and names its folder; ``cpu`` and ``paper``
    are the presets of the two scales, ``overrides`` apply to both; ``splits`` are the evaluation
    splits shown, in the paper's column order."""

    name: str
    cpu: str
    paper: str
    overrides: tuple[str, ...] = ()
    splits: tuple[str, ...] = ("id",)


@dataclass(frozen=True, kw_only=True)
class PaperTable:
    """A table of a paper. ``rows``: (the paper's row name, poslab encoding spec); ``numbers``: the
    paper's value per row name and column ``"<part>/<split>"`` (missing: the paper has none);
    ``metric``: the headline metric of the runs ('error' or 'accuracy', in %, or 'ppl')."""

    name: str
    title: str
    source: str
    metric: str
    rows: tuple[tuple[str, str], ...]
    parts: tuple[Part, ...]
    numbers: dict[str, dict[str, float]] = field(default_factory=dict)
    paper_setting: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)

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

    @property
    def columns(self) -> list[str]:
        """``"<part>/<split>"`` for every part and split, in order."""
        return [f"{part.name}/{split}" for part in self.parts for split in part.splits]


TABLES: dict[str, PaperTable] = {}


def _register(table: PaperTable) -> PaperTable:
    TABLES[table.name] = table
    return table


def get_table(name: str) -> PaperTable:
    """The table called ``name``; ValueError naming the known ones otherwise."""
    if name not in TABLES:
        raise ValueError(f"unknown table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name]


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
