"""Workarounds for Ray behaviour, in one place. Each names the Ray version it was written for.

Everything here touches a private Ray API; when Ray changes, this is the one module to check.
Import it only where Ray is already in use.
"""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback


class IdleBackoff(ExecutionCallback):
    """Ray 2.60: keep Ray Data's streaming executor from spinning while it waits on its consumer.

    The executor waits for work (``ray.wait`` with a timeout) only while some task runs.
    When all of its operators are held back because the consumer (a Train worker's training
    step) is slower than the reads, its scheduling loop spins: in ``make demo`` each Train
    worker's executor thread took 61% of a core (py-spy, per-thread CPU time) on a 2-core
    machine where the two training threads got about a third of a core each. Sleeping a few
    milliseconds after a step that found nothing running hands that core back.
    """

    idle_sleep_s = 0.005

    def on_execution_step(self, executor) -> None:
        if not any(op.num_active_tasks() for op in executor._topology):
            time.sleep(self.idle_sleep_s)


def quiet_idle_executor(context) -> None:
    """Install :class:`IdleBackoff` on a dataset's context (``ds.context``)."""
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
