"""mtseg.compat: each private Ray API it relies on is still where it was (Ray 2.60).

When Ray moves one of them, the test naming it fails here rather than a run going quietly
noisy or slow.
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest

from mtseg import compat


@pytest.mark.parametrize("name", sorted(compat.RUNTIME_ENV_LOG_LEVELS))
def test_runtime_env_loggers_are_the_ones_ray_logs_to(name):
    module = importlib.import_module(name)
    loggers = [v.name for v in vars(module).values() if isinstance(v, logging.Logger)]
    assert name in loggers


def test_train_report_log_is_quieted_on_the_logger_ray_train_uses():
    from ray.train.v2._internal.execution import context

    report_logger = logging.getLogger(context.__file__)
    saved = report_logger.level
    try:
        compat.quiet_train_report_log("WARNING")
        assert context.logger is report_logger
        assert not report_logger.isEnabledFor(logging.INFO)
    finally:
        report_logger.setLevel(saved)


def test_excluded_by_ray_matches_gitignore_syntax_as_ray_does():
    from mtseg.submit import WORKING_DIR_EXCLUDES

    assert compat.excluded_by_ray("runs/demo/config.yaml", WORKING_DIR_EXCLUDES)
    assert not compat.excluded_by_ray("jobs/configs/demo.yaml", WORKING_DIR_EXCLUDES)
    assert compat.excluded_by_ray("a/b/x.pyc", ["*.pyc"])


def test_idle_backoff_is_installed_once_and_hooks_into_the_executor_step():
    from ray.data import DataContext
    from ray.data._internal.execution.interfaces import PhysicalOperator
    from ray.data._internal.execution.streaming_executor import StreamingExecutor

    ctx = DataContext()
    compat.quiet_idle_executor(ctx)
    compat.quiet_idle_executor(ctx)
    assert ctx.custom_execution_callback_classes.count(compat.IdleBackoff) == 1
    assert compat.IdleBackoff in ctx.execution_callback_classes
    # IdleBackoff reads the executor's operators from _topology and asks each for its tasks.
    assert "_topology" in vars(StreamingExecutor(ctx))
    assert callable(PhysicalOperator.num_active_tasks)


def test_idle_backoff_sleeps_longer_while_idle_and_resets_when_a_task_runs(monkeypatch):
    slept = []
    monkeypatch.setattr(compat.time, "sleep", slept.append)

    class Op:
        active = 0

        def num_active_tasks(self):
            return self.active

    class Executor:
        _topology = {Op(): None}

    executor, backoff = Executor(), compat.IdleBackoff()
    for _ in range(8):
        backoff.on_execution_step(executor)
    assert slept == [0.001, 0.002, 0.004, 0.008, 0.016, 0.02, 0.02, 0.02]
    next(iter(executor._topology)).active = 1
    backoff.on_execution_step(executor)  # busy: no sleep, back to the shortest
    next(iter(executor._topology)).active = 0
    backoff.on_execution_step(executor)
    assert slept[-1] == 0.001 and len(slept) == 9


def test_ray_trains_cleaner_finds_its_ray_by_address_lookup_which_pin_ray_address_pins(monkeypatch):
    """Ray Train's placement-group cleaner asks ``is_actor_alive``, which calls the State API with
    no address: RAY_ADDRESS decides which Ray answers. ``pin_ray_address`` sets it to the worker's own."""
    import inspect

    import ray
    from ray.train.v2._internal.execution.controller import placement_group_cleaner
    from ray.train.v2._internal.state import util

    assert placement_group_cleaner.is_actor_alive is util.is_actor_alive
    assert "address" not in inspect.signature(util.is_actor_alive).parameters
    assert "get_actor(actor_id, timeout=timeout)" in inspect.getsource(util.is_actor_alive)

    class Context:
        gcs_address = "127.0.0.1:6380"

    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    monkeypatch.setenv("RAY_ADDRESS", "another Ray's")  # and restored (or removed) after the test
    compat.pin_ray_address()
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:6380"
