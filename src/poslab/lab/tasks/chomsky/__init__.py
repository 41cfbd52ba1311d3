"""The 15 Chomsky-hierarchy tasks (Deletang et al., arXiv 2207.02098) as encoder tasks, by level.

Each generator follows DeepMind's code (google-deepmind/neural_networks_chomsky_hierarchy, and its
copy in google-deepmind/randomized_positional_encodings, whose protocol DAPE's table uses): the
same token ids, output lengths, end tokens and sampling, and the same pooled per-token accuracy.

The registry keeps the paper's task names (table 2 of Deletang et al.). Three of DeepMind's code
keys differ, listed in `DEEPMIND_NAMES`; one of them cannot be an alias, since DeepMind's
``modular_arithmetic`` is the regular-level task, named ``modular_arithmetic_simple`` here, while
``modular_arithmetic`` here is the paper's context-free one (DeepMind's
``modular_arithmetic_brackets``).

Where poslab differs from that code without changing a reported number:

- ``modular_arithmetic_simple`` and ``modular_arithmetic`` have one input symbol fewer (8 and 10
  against 9 and 11): DeepMind's input one-hot reserves a slot that never occurs (a blank ``_``;
  an ``x`` left over from the equation alphabet). A symbol that never occurs never reaches the
  model, and the output sizes, hence chance levels, are the same.
- Lengths below a task's ``min_length`` are raised to it (``solve_equation`` and the binary
  arithmetic tasks: 3, ``missing_duplicate``: 2), where DeepMind's code emits a filler example
  outside the task's grammar (a binary number without operator, an all-zero string with answer 0,
  a lone ``1``). This touches only the shortest one or two training lengths, none of the
  out-of-distribution lengths that the tables report.
- After the end token, outputs are padding and neither scored nor trained on; DeepMind's code also
  leaves them out of the accuracy but puts the padding (zeros) in the training loss.
"""

from poslab.lab.tasks.base import TASKS
from poslab.lab.tasks.chomsky import (  # noqa: F401  (importing a module registers its tasks)
    context_free,
    context_sensitive,
    regular,
)
from poslab.lab.tasks.chomsky.base import END, PLACEHOLDER, ChomskyTask

LEVELS = ("regular", "context_free", "context_sensitive")

# poslab registry name -> the key of DeepMind's code (experiments/constants.py), where they differ.
DEEPMIND_NAMES = {
    "modular_arithmetic_simple": "modular_arithmetic",
    "modular_arithmetic": "modular_arithmetic_brackets",
    "missing_duplicate": "missing_duplicate_string",
}


def chomsky_tasks() -> list[str]:
    """The registered Chomsky tasks by level (regular, context-free, context-sensitive), within a level
    in the order its module registers them (table 1 of Deletang et al., and docs/tasks.md)."""
    names = [name for name, cls in TASKS.items() if issubclass(cls, ChomskyTask)]
    return sorted(names, key=lambda name: LEVELS.index(TASKS[name].level))  # stable within a level


__all__ = ["DEEPMIND_NAMES", "END", "LEVELS", "PLACEHOLDER", "ChomskyTask", "chomsky_tasks"]
