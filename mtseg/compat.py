"""Workarounds for Ray behaviour, in one place. Each names the Ray version it was written for.

Everything here touches a private Ray API; when Ray changes, this is the one module to check
(tests/test_compat.py fails, naming the API, when one of them moves).
Import it only where Ray is already in use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from ray.data._internal.execution.execution_callback import ExecutionCallback

# Ray 2.60 logs INFO lines per ignore file and per upload (again on every retry) while it
# packages a job's working_dir, and warns that .git is now excluded by default (mtseg excludes
# it anyway); mtseg submit prints its own one-line summaries instead. These are the loggers of
# ray/_private/runtime_env/{packaging,working_dir}.py, with the level that keeps them quiet.
RUNTIME_ENV_LOG_LEVELS = {
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def excluded_by_ray(path: str, patterns: Iterable[str]) -> bool:
    """Whether Ray leaves ``path`` (relative, POSIX) out of a runtime_env upload excluding ``patterns``.

    Ray 2.60: the matcher Ray itself applies to ``runtime_env`` excludes (its vendored pathspec,
    gitignore syntax), so a check before submitting agrees with what is uploaded.
    """
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", list(patterns)).match_file(path)


def quiet_train_report_log(level: str | int) -> None:
    """Set the level of Ray Train's per-report log line on this worker (``train.ray_log_level``).

    Ray 2.60 logs every ``ray.train.report`` at INFO under a logger named after the file path of
    ``ray/train/v2/_internal/execution/context.py``, outside the ``ray.train`` namespace that
    ``RunConfig(logging_config=...)`` filters.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # a Ray without that module: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(level)


def worker_pool_config(num_cpus: int | None) -> dict[str, int]:
    """Ray system config that keeps idle worker processes for reuse (Ray 2.60).

    Ray keeps at most ``num_workers_soft_limit`` idle worker processes and kills the others
    after ``idle_worker_killing_time_threshold_ms`` (1 s). Unset, the limit is the node's
    *available* CPUs, about zero while Ray Train's workers and Ray Data's read tasks hold
    them: every read task then started a fresh Python process that imported torch again (49
    processes in one ``make demo`` on 2 CPUs, seconds of CPU each). Pass it as
    ``ray.init(_system_config=...)``, or as ``RAY_<key>`` variables to ``ray start``.
    """
    return {"num_workers_soft_limit": max(8, 2 * (num_cpus or os.cpu_count() or 1))}


class IdleBackoff(ExecutionCallback):
    """Ray 2.60: keep Ray Data's streaming executor from spinning while it waits on its consumer.

    The executor waits for work (``ray.wait`` with a timeout) only while some task runs.
    When all of its operators are held back because the consumer (a Train worker's training
    step) is slower than the reads, its scheduling loop spins: in ``make demo`` each Train
    worker's executor thread took 61% of a core (py-spy, per-thread CPU time) on a 2-core
    machine where the two training threads got about a third of a core each. Sleeping a few
    milliseconds after a step that found nothing running hands that core back; the sleep
    doubles while the executor stays idle (1 ms to 20 ms: a training step takes hundreds of
    ms and two batches are prefetched) and drops back as soon as a task runs.
    """

    min_sleep_s = 0.001
    max_sleep_s = 0.02

    def __init__(self) -> None:
        super().__init__()
        self._sleep_s = self.min_sleep_s

    def on_execution_step(self, executor) -> None:
        if any(op.num_active_tasks() for op in executor._topology):
            self._sleep_s = self.min_sleep_s
            return
        time.sleep(self._sleep_s)
        self._sleep_s = min(self.max_sleep_s, 2 * self._sleep_s)


def quiet_idle_executor(context) -> None:
    """Install :class:`IdleBackoff` on a dataset's context (``ds.context``)."""
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)


def forget_running_trials(search_alg) -> None:
    """Ray 2.60 (mtseg issue 12): make a restored Tune search algorithm count no trial as running.

    Tune uploads its experiment state and the search algorithm's state as separate files. A
    driver killed between the two leaves an algorithm that still counts a finished trial as
    running; at ``max_concurrent`` it then never hands out another trial and the resumed search
    waits forever. Tune re-queues the restored trials itself, so the running set can start
    empty. Call it after ``set_state``; the counters are private state of
    ``BasicVariantGenerator`` (``_live_trials``) and ``ConcurrencyLimiter`` (``live_trials``,
    ``num_unfinished_live_trials``).
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if isinstance(search_alg, BasicVariantGenerator):
        search_alg._live_trials = set()
    elif isinstance(search_alg, ConcurrencyLimiter):
        search_alg.live_trials = set()
        search_alg.num_unfinished_live_trials = 0
