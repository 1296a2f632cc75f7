"""Learning tasks behind one interface (:class:`haven.learn.tasks.base.Task`); see ``get_task``."""

from __future__ import annotations

from haven.learn.tasks.base import Task
from haven.learn.tasks.classification import Classification

# config `task:` value → the Task; a new task is one new module and one line here
TASKS: dict[str, type[Task]] = {"classification": Classification}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)}); set `task:` in the project") from None
