"""Tasks of the multi-task model: one module per task, and the registry that names them.

Adding a task is one new module implementing :class:`~mtseg.tasks.base.Task` and one
line in :data:`TASKS`; a task defined outside mtseg is added with ``@register`` (Ray Train
workers and Tune trials get it through :func:`task_classes`)::

    tasks = build_tasks(cfg, categories)              # {name: Task}, in cfg.tasks.names order
    images = model_inputs(batch, tasks, cfg, train=True)
    outputs = model(images)
    losses = compute_losses(tasks, outputs, batch)    # {name: scalar tensor}
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch

from mtseg.config import KNOWN_TASK_NAMES
from mtseg.tasks.base import Task
from mtseg.tasks.boundary import BoundaryTask
from mtseg.tasks.instance import InstanceTask
from mtseg.tasks.reconstruction import ReconstructionTask
from mtseg.tasks.semantic import SemanticTask
from mtseg.tasks.supercategory import SupercategoryTask

if TYPE_CHECKING:
    from mtseg.config import Config
    from mtseg.data.categories import CategoryIndex

TASKS: dict[str, type[Task]] = {
    "semantic": SemanticTask,
    "supercategory": SupercategoryTask,
    "boundary": BoundaryTask,
    "instance": InstanceTask,
    "reconstruction": ReconstructionTask,
}


def register(cls: type[Task]) -> type[Task]:
    """Add a task class to :data:`TASKS` under its ``name`` (a class decorator), so configs can name it.

    Registering the same class again (e.g. a module imported twice) replaces the entry.

    Args:
        cls: a concrete subclass of :class:`~mtseg.tasks.base.Task`.

    Returns:
        ``cls``.

    Raises:
        TypeError: ``cls`` is not a Task subclass.
        ValueError: its name is empty or another task class already has it.
    """
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"register: {cls!r} is not a subclass of mtseg.tasks.Task")
    name = getattr(cls, "name", "")
    if not isinstance(name, str) or not name:
        raise ValueError(f"register: {cls.__qualname__} has no name (set the class attribute name)")
    known = TASKS.get(name)
    if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"register: task {name!r} is already {known.__module__}.{known.__qualname__}")
    TASKS[name] = cls
    if name not in KNOWN_TASK_NAMES:
        KNOWN_TASK_NAMES.append(name)
    module = sys.modules.get(cls.__module__)
    if module is not None and not module.__name__.startswith("mtseg."):
        # Its module (a script, a test file) may not be importable on Ray workers: ship the code.
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    return cls


def task_classes() -> tuple[type[Task], ...]:
    """Every registered task class, to ship to Ray workers and :func:`register` there."""
    return tuple(TASKS.values())


def build_tasks(cfg: Config, categories: CategoryIndex) -> dict[str, Task]:
    """Build the configured task set.

    Args:
        cfg: resolved config; ``cfg.tasks.names`` picks and orders the tasks.
        categories: the dataset's label spaces (from the shard manifest).

    Returns:
        ``{name: Task}`` in ``cfg.tasks.names`` order.
    """
    unknown = [n for n in cfg.tasks.names if n not in TASKS]
    if unknown:
        raise ValueError(f"tasks.names: unknown task {unknown[0]!r}; tasks are {', '.join(TASKS)}")
    return {name: TASKS[name].from_config(cfg, categories) for name in cfg.tasks.names}


def model_inputs(
    batch: dict[str, torch.Tensor],
    tasks: dict[str, Task],
    cfg: Config | None = None,
    train: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The image tensor to feed the model, after every task's input transform.

    With reconstruction and ``train=True``, random patches are masked (the mask goes to
    ``batch["recon_mask"]``; ``batch["image"]``, the target, is left untouched).

    Args:
        batch: a training batch (see the data contract); ``"image"`` is required.
        tasks: from :func:`build_tasks`.
        cfg: unused (the tasks hold their settings).
        train: whether this is a training step.
        generator: random source for the masks (reproducible runs and tests).

    Returns:
        (B, 3, H, W) float images in [0, 1].
    """
    if "image" not in batch:
        raise KeyError(f"model_inputs: the batch has no 'image' (has {', '.join(sorted(batch))})")
    images = batch["image"]
    for task in tasks.values():
        images = task.transform_inputs(images, batch, train=train, generator=generator)
    return images


def compute_losses(
    tasks: dict[str, Task], outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-task losses; stateless.

    Args:
        tasks: from :func:`build_tasks`.
        outputs: the model's ``{task: output}`` at input resolution.
        batch: the batch with every task's ``target_keys``.

    Returns:
        ``{task: scalar float32 tensor}`` in ``tasks`` order.
    """
    missing = [name for name in tasks if name not in outputs]
    if missing:
        raise KeyError(f"compute_losses: the model returned no {missing[0]!r} output (has {', '.join(outputs)})")
    return {name: task.loss(outputs[name], batch) for name, task in tasks.items()}


__all__ = [
    "TASKS",
    "BoundaryTask",
    "InstanceTask",
    "ReconstructionTask",
    "SemanticTask",
    "SupercategoryTask",
    "Task",
    "build_tasks",
    "compute_losses",
    "model_inputs",
    "register",
    "task_classes",
]
