"""Learning tasks behind one interface (:class:`haven.learn.tasks.base.Task`); see ``get_task``."""

from __future__ import annotations

from haven.learn.tasks.base import Task
from haven.learn.tasks.classification import Classification
from haven.learn.tasks.multilabel import MultiLabel
from haven.learn.tasks.ordinal import Ordinal
from haven.learn.tasks.segmentation import Segmentation

# config `task:` value → the Task; a new task is one new module and one line here
TASKS: dict[str, type[Task]] = {"classification": Classification, "multilabel": MultiLabel, "ordinal": Ordinal,
                                "segmentation": Segmentation}


def get_task(name: str, options: dict | None = None) -> Task:
    """The task ``name`` with its options (the project's section of that name, e.g. ``ordinal:``)."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)}); set `task:` in the project") from None
    return cls(options)
