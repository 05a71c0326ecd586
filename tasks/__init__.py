"""Task types: what a model is trained, distilled, calibrated and scored on (splits, encoding, loss, metric)."""

from collections.abc import Callable

from ziplm.tasks.base import Example, Metric, Task, batches
from ziplm.tasks.classification import TaskSpec, load_classification

# task.type -> its loader; a new task type adds its loader here (docs/extending.md)
TASK_TYPES: dict[str, Callable[[TaskSpec], Task]] = {"classification": load_classification}


def load_task(spec: TaskSpec) -> Task:
    """The task a recipe's `task:` section describes, loaded by its type's loader."""
    return TASK_TYPES[spec.type](spec)


__all__ = ["Example", "Metric", "Task", "TaskSpec", "batches", "load_task"]
