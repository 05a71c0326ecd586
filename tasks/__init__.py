"""Task types: what a model is trained, distilled, calibrated and scored on (splits, encoding, loss, metric)."""

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import Discriminator, Tag

from ziplm.tasks.base import Example, Metric, Task, batches
from ziplm.tasks.causal_lm import CausalLMSpec, load_causal_lm
from ziplm.tasks.classification import TaskSpec, load_classification
from ziplm.tasks.data import DataSpec
from ziplm.tasks.embedding import EmbeddingSpec, load_embedding

# task.type -> its loader; a new task type adds its loader here and its spec to AnyTaskSpec (docs/extending.md)
TASK_TYPES: dict[str, Callable[[Any], Task]] = {"classification": load_classification, "embedding": load_embedding,
                                                "causal_lm": load_causal_lm}


def _task_type(section: Any) -> str:
    """A recipe's `task:` section's type (classification where it names none)."""
    return section.get("type", "classification") if isinstance(section, dict) else section.type


AnyTaskSpec = Annotated[Annotated[TaskSpec, Tag("classification")] | Annotated[EmbeddingSpec, Tag("embedding")]
                        | Annotated[CausalLMSpec, Tag("causal_lm")],
                        Discriminator(_task_type, custom_error_type="task_type",
                                      custom_error_message=f"the task type is one of {', '.join(TASK_TYPES)}")]


def load_task(spec: DataSpec) -> Task:
    """The task a recipe's `task:` section describes, loaded by its type's loader."""
    return TASK_TYPES[spec.type](spec)


__all__ = ["AnyTaskSpec", "CausalLMSpec", "EmbeddingSpec", "Example", "Metric", "Task", "TaskSpec", "batches",
           "load_task"]
