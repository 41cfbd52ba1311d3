"""Synthetic tasks, registered by name: flip-flop, selective copy, counting, the Chomsky tasks and
the length-generalisation probes (pass key, MQAR, repeated text).

Example::

    task = build_task("flipflop", p=0.8)
    batch = task.sample(32, 64, generator=torch.Generator().manual_seed(0), **task.splits()["id"])
"""

from poslab.lab.tasks import (  # noqa: F401  (registers them)
    chomsky,
    counting,
    flipflop,
    language_modelling,
    mqar,
    passkey,
    repeated_text,
    selective_copy,
)
from poslab.lab.tasks.base import TASKS, Batch, Task, build_task, list_tasks, register
from poslab.lab.tasks.chomsky import ChomskyTask

__all__ = ["TASKS", "Batch", "ChomskyTask", "Task", "build_task", "list_tasks", "register"]
