"""The 15 Chomsky-hierarchy tasks (Deletang et al., arXiv 2207.02098) as encoder tasks, by level."""

from poslab.tasks.chomsky import (  # noqa: F401  (importing a module registers its tasks)
    context_free,
    context_sensitive,
    regular,
)
from poslab.tasks.chomsky.base import END, PLACEHOLDER, ChomskyTask

__all__ = ["END", "PLACEHOLDER", "ChomskyTask"]
