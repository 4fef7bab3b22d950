"""Workarounds for Ray behaviour that touch private Ray APIs, each naming the Ray version it was written for.

When Ray changes, this is the one module to check (tests/test_compat.py names the API that
moved). Import it only where Ray is already in use.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

from ray.data._internal.execution.execution_callback import ExecutionCallback

# Ray 2.60 logs INFO lines per ignore file and per upload while it packages a job's working_dir,
# and warns that .git is excluded by default; mtseg submit prints its own one-line summaries.
RUNTIME_ENV_LOG_LEVELS = {
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def excluded_by_ray(path: str, patterns: Iterable[str]) -> bool:
    """Whether Ray leaves ``path`` (relative, POSIX) out of a runtime_env upload excluding ``patterns``.

    Ray 2.60: uses Ray's own matcher (its vendored pathspec), so the check agrees with the upload.
    """
    from ray._private.thirdparty.pathspec import PathSpec

    return PathSpec.from_lines("gitwildmatch", list(patterns)).match_file(path)


def pin_ray_address() -> None:
    """Point this Ray worker's own address lookups at the Ray it belongs to (``mtseg.cluster.PIN_RAY_ADDRESS_HOOK``).

    Ray 2.60: Ray Train's detached ``PlacementGroupCleaner`` asks the State API whether its
    controller is alive through ``ray.util.state.get_actor()`` with no address. Without
    ``RAY_ADDRESS`` that resolves to the Ray last recorded in ``/tmp/ray/ray_current_cluster``
    (written by ``ray start`` and ``ray.cluster_utils.Cluster``), else to the only GCS running
    on the machine. With a second Ray on the machine it either raises ``Found multiple active
    Ray instances`` (a 30-line traceback per run) or asks the other Ray, which does not know
    the controller: ``is_actor_alive`` takes that as dead and the cleaner removes the live
    run's placement group, killing its workers ("Destroying worker since its placement group
    was removed"). ray-project/ray#65447's review notes the missing-means-dead reading.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


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

    Ray's default ``num_workers_soft_limit`` is the node's *available* CPUs, about zero while
    Train and Data hold them, so every read task started a fresh process importing torch. Pass
    it as ``ray.init(_system_config=...)``, or as ``RAY_<key>`` variables to ``ray start``.
    """
    return {"num_workers_soft_limit": max(8, 2 * (num_cpus or os.cpu_count() or 1))}


class IdleBackoff(ExecutionCallback):
    """Ray 2.60: keep Ray Data's streaming executor from spinning while it waits on its consumer.

    With every operator held back by a slower consumer (a training step), the executor's loop
    spins: 61% of a core per Train worker in ``make demo`` on 2 cores. A step that found nothing
    running sleeps, 1 ms doubling to 20 ms (a training step takes hundreds of ms), and the
    sleep drops back as soon as a task runs.
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
    """Ray 2.60: make a restored Tune search algorithm count no trial as running (call after ``set_state``).

    A driver killed between Tune's experiment-state and search-state uploads leaves an
    algorithm counting a finished trial as running; at ``max_concurrent`` the resumed search
    then waits forever. Tune re-queues the restored trials itself, so the set can start empty.
    """
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if isinstance(search_alg, BasicVariantGenerator):
        search_alg._live_trials = set()
    elif isinstance(search_alg, ConcurrencyLimiter):
        search_alg.live_trials = set()
        search_alg.num_unfinished_live_trials = 0
