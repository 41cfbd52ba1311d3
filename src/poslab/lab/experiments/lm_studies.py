"""The DAPE paper's language-model studies as data (arXiv 2405.14722; V2: arXiv 2410.04798).

A `LMStudy` holds its rows (a name and poslab's encoding spec), its parts (one `poslab
lm-extrapolation` grid each: a preset and overrides, e.g. the code and the prose corpus, or one model
size), how far past the training length it scores (64 times: the paper's 128 -> 8192), the two rows
whose gap the page tabulates, and the paper's numbers. `poslab lm-study NAME`
(`poslab.lab.experiments.lm_study`) trains and scores every part and writes the page
(`poslab.lab.experiments.lm_study_page`).

The paper's models are 125M and 350M parameters trained on Arxiv and Books3; ours are 0.5M to 7M
parameters trained on the Python standard library or the Python documentation. Compare the pattern
(which encodings blow up, which keep improving with context), not the values.
"""

from __future__ import annotations

from dataclasses import dataclass

from poslab.registry import Registry


@dataclass(frozen=True, kw_only=True)
class StudyPart:
    """One grid of a study: ``name`` names its folder, ``preset`` and ``overrides`` its config."""

    name: str
    preset: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PaperNumber:
    """A perplexity the paper reports: ``row`` in ``setting`` (model, corpus), trained at
    ``train_len`` and scored at ``length``. The page sets ours at the same multiple beside it."""

    setting: str
    row: str
    train_len: int
    length: int
    value: float


@dataclass(frozen=True, kw_only=True)
class LMStudy:
    """A study: ``rows`` (name, encoding spec), ``parts``, scored at L, 2L, ... up to ``factor``
    times the training length; ``gap``: two rows (a DAPE variant, its base) whose difference at the
    longest length the page tabulates per part; ``numbers``: the paper's."""

    name: str
    title: str
    source: str
    rows: tuple[tuple[str, str], ...]
    parts: tuple[StudyPart, ...]
    paper_setting: str
    factor: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    gap: tuple[str, str] | None = None
    numbers: tuple[PaperNumber, ...] = ()

    def __post_init__(self) -> None:
        names = [row for row, _ in self.rows]
        if len(set(names)) < len(names) or len({spec for _, spec in self.rows}) < len(self.rows):
            raise ValueError(f"study {self.name}: every row needs its own name and spec")
        if len({part.name for part in self.parts}) < len(self.parts):
            raise ValueError(f"study {self.name}: two parts share a name")
        if self.factor < 1 or self.factor & (self.factor - 1):
            raise ValueError(f"study {self.name}: factor must be a power of two, got {self.factor}")
        if self.gap is not None and (len(self.gap) != 2 or set(self.gap) - set(names)):
            raise ValueError(f"study {self.name}: gap must name two of its rows, got {self.gap!r}")
        unknown = {number.row for number in self.numbers} - set(names)
        if unknown:
            raise ValueError(f"study {self.name}: paper numbers for rows it does not have: {sorted(unknown)}")

    def spec(self, row: str) -> str:
        return dict(self.rows)[row]


STUDIES: Registry[LMStudy] = Registry("study", "studies")


def _register(study: LMStudy) -> LMStudy:
    return STUDIES.add(study.name, study)


def get_study(name: str) -> LMStudy:
    """The study called ``name``; ValueError naming the known ones otherwise."""
    return STUDIES.lookup(name)


# -- the studies -----------------------------------------------------------------------------------

# The paper's numbers as the reproduction issue quotes them (the DAPE paper's length-extrapolation
# tables; the 350M corpus is not named there), not re-read from the paper here: check them against
# the paper's tables before citing.
_PROSE = ("task.options.corpus=python_docs", "task.options.tokenizer=bpe")
_SOURCE = "DAPE paper (arXiv 2405.14722) and DAPE V2 (arXiv 2410.04798)"
_ARXIV_128 = "125M, Arxiv, trained at 128"
_BOOKS_512 = "125M, Books3, trained at 512"
_LARGE_512 = "350M, trained at 512"
_KERPLE_NUMBERS = (
    PaperNumber(setting=_ARXIV_128, row="Kerple", train_len=128, length=8192, value=31.93),
    PaperNumber(setting=_ARXIV_128, row="DAPE-Kerple", train_len=128, length=8192, value=5.00),
    PaperNumber(setting=_BOOKS_512, row="Kerple", train_len=512, length=8192, value=39.31),
    PaperNumber(setting=_BOOKS_512, row="DAPE-Kerple", train_len=512, length=8192, value=17.88),
    PaperNumber(setting=_LARGE_512, row="Kerple", train_len=512, length=8192, value=22.76),
    PaperNumber(setting=_LARGE_512, row="DAPE-Kerple", train_len=512, length=8192, value=3.43),
)
_CPU_SETTING = (
    "here `lm_stdlib_small` (2 layers, d 128, 4 heads, 0.46M parameters, 600 steps of 16 windows of "
    "128 tokens, about 0.1 epoch), scored on 8 non-overlapping validation windows per length"
)

_register(
    LMStudy(
        name="dape_extrapolation",
        title="Length extrapolation: trained at 128, perplexity on the last 256 tokens up to 64x",
        source=_SOURCE,
        rows=(
            ("NoPE", "nope"),
            ("RoPE", "rope"),
            ("T5", "t5"),
            ("ALiBi", "alibi"),
            ("Kerple", "kerple_log"),
            ("FIRE", "fire"),
            ("DAPE-ALiBi", "dape[base=alibi]"),
            ("DAPE-Kerple", "dape[base=kerple_log]"),
            ("DAPE-FIRE", "dape[base=fire]"),
            ("DAPE V2-Kerple", "dape[base=kerple_log,kernel_size=3]"),
            ("CoPE (not in the paper)", "cope"),
        ),
        parts=(
            StudyPart(name="stdlib", preset="lm_stdlib_small"),
            StudyPart(name="python_docs", preset="lm_stdlib_small", overrides=_PROSE),
        ),
        gap=("DAPE-Kerple", "Kerple"),
        numbers=(
            *_KERPLE_NUMBERS,
            PaperNumber(setting=_LARGE_512, row="ALiBi", train_len=512, length=8192, value=4.21),
            PaperNumber(setting=_LARGE_512, row="DAPE-ALiBi", train_len=512, length=8192, value=3.57),
        ),
        paper_setting="the paper trains 125M and 350M decoders on Arxiv and Books3 at 128 or 512 "
        f"tokens and scores up to 8192; {_CPU_SETTING}: bytes of the Python standard library "
        "(`stdlib`) and 4096 BPE tokens of the Python documentation's reST sources (`python_docs`)",
    )
)

_register(
    LMStudy(
        name="dape_scale",
        title="Scale: does the DAPE-Kerple minus Kerple gap at 64x grow with the model and training?",
        source=_SOURCE,
        rows=(("Kerple", "kerple_log"), ("DAPE-Kerple", "dape[base=kerple_log]")),
        parts=(
            StudyPart(name="x1", preset="lm_stdlib_small"),
            StudyPart(name="x4", preset="lm_stdlib_x4"),
            StudyPart(name="x16", preset="lm_stdlib_x16"),
            StudyPart(name="x1_steps4", preset="lm_stdlib_small", overrides=("train.steps=2400",)),
            StudyPart(name="x4_steps4", preset="lm_stdlib_x4", overrides=("train.steps=2400",)),
            StudyPart(name="x16_lr1e-3", preset="lm_stdlib_x16", overrides=("train.lr=0.001",)),
        ),
        gap=("DAPE-Kerple", "Kerple"),
        numbers=_KERPLE_NUMBERS,
        paper_setting="in the paper Kerple degrades past the training length while DAPE-Kerple keeps "
        f"improving, at 125M and 350M parameters; {_CPU_SETTING}. The parts widen it to d 256 "
        "(`lm_stdlib_x4`, 1.7M parameters) and d 512 (`lm_stdlib_x16`, 6.6M) and train 4 times longer "
        "(2400 steps, about 0.4 epoch), the learning rate unchanged (3e-3); `x16_lr1e-3` retrains d 512 "
        "at 1e-3 for both rows, because at 3e-3 it trained worse than d 256",
    )
)

_register(
    LMStudy(
        name="dape_width",
        title="The width D of DAPE's MLP (DAPE-ALiBi, trained at 128)",
        source=_SOURCE,
        rows=(
            ("ALiBi", "alibi"),
            ("DAPE-ALiBi D=4", "dape[base=alibi,width=4]"),
            ("DAPE-ALiBi D=16", "dape[base=alibi,width=16]"),
            ("DAPE-ALiBi D=32", "dape[base=alibi,width=32]"),
            ("DAPE-ALiBi D=64", "dape[base=alibi,width=64]"),
        ),
        parts=(StudyPart(name="stdlib", preset="lm_stdlib_small"),),
        numbers=(
            PaperNumber(setting=_ARXIV_128, row="ALiBi", train_len=128, length=128, value=8.31),
            PaperNumber(setting=_ARXIV_128, row="ALiBi", train_len=128, length=8192, value=5.85),
            PaperNumber(setting=_ARXIV_128, row="DAPE-ALiBi D=4", train_len=128, length=128, value=8.25),
            PaperNumber(setting=_ARXIV_128, row="DAPE-ALiBi D=4", train_len=128, length=8192, value=5.67),
        ),
        paper_setting=f"the paper sweeps D over 4 to 64 with a 125M model trained at 128; {_CPU_SETTING} "
        "(DAPE's default D is 32)",
    )
)

_register(
    LMStudy(
        name="dape_ablation",
        title="Which terms DAPE needs: A + B, A + f(B), A + f(A, B), A + B + f(A, B) over Kerple",
        source=_SOURCE,
        rows=(
            ("A+B (Kerple)", "kerple_log"),
            ("A+f(B)", "dape[base=kerple_log,form=A+f(B)]"),
            ("A+f(A,B)", "dape[base=kerple_log,form=A+f(A,B)]"),
            ("A+B+f(A,B) (DAPE-Kerple)", "dape[base=kerple_log]"),
        ),
        parts=(StudyPart(name="stdlib", preset="lm_stdlib_small"),),
        paper_setting="A: the attention logits, B: Kerple's bias, f: DAPE's MLP; the paper ablates them "
        f"with a 125M model; {_CPU_SETTING} (no numbers of the paper's ablation are recorded here yet)",
    )
)
