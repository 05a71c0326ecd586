"""Task types: what a model is trained, distilled, calibrated and scored on (splits, encoding, loss, metric)."""

from ziplm.tasks.base import Example, Metric, Task, batches
from ziplm.tasks.classification import TaskSpec, load_classification


def load_task(spec: TaskSpec) -> Task:
    """The task a recipe's `task:` section describes (classification is the one task type so far)."""
    return load_classification(spec)


__all__ = ["Example", "Metric", "Task", "TaskSpec", "batches", "load_task"]
