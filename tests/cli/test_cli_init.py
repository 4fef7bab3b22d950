"""``mtseg.cli.main``: where every exit code is decided, and the one error base class it catches."""

from __future__ import annotations

import importlib

import pytest

from mtseg import cluster
from mtseg.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from mtseg.errors import MtsegError

# Every error mtseg raises for the user, with the built-in base that callers may still catch.
ERRORS = [
    ("mtseg.storage", "StorageError", RuntimeError),
    ("mtseg.cluster", "ClusterError", RuntimeError),
    ("mtseg.config", "ConfigError", ValueError),
    ("mtseg.tune.space", "SearchError", RuntimeError),
    ("mtseg.demo", "DemoError", RuntimeError),
    ("mtseg.train.runstate", "RunLockedError", RuntimeError),
    ("mtseg.train.checkpoint", "CheckpointError", RuntimeError),
    ("mtseg.data.shard", "ShardError", ValueError),
    ("mtseg.data.synth", "SynthError", ValueError),
    ("mtseg.data.manifest", "ManifestError", ValueError),
    ("mtseg.predict", "PredictError", ValueError),
    ("mtseg.submit", "SubmitError", RuntimeError),
]


@pytest.mark.parametrize("module, name, base", ERRORS)
def test_every_error_is_an_mtseg_error_and_keeps_its_builtin_base(module, name, base):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, MtsegError) and issubclass(cls, base)


def _command_raises(monkeypatch, exc: BaseException) -> None:
    """``mtseg cluster status`` raises ``exc`` (the command is beside the point: main's mapping is)."""

    def load(*a, **k):
        raise exc

    monkeypatch.setattr(cluster.LocalStack, "load", load)


def test_an_mtseg_error_is_one_line_and_its_exit_code(monkeypatch, one_line_error):
    _command_raises(monkeypatch, cluster.ClusterError("runs/stack/stack.json: not a stack state"))
    assert main(["cluster", "status"]) == EXIT_USAGE == 2
    one_line_error("runs/stack/stack.json: not a stack state")

    from mtseg.demo import DemoError

    _command_raises(monkeypatch, DemoError("training failed: boom"))  # the demo ran and failed: exit 1, as a missed target
    assert main(["cluster", "status"]) == 1
    one_line_error("training failed: boom")


def test_ctrl_c_exits_130(monkeypatch, capsys):
    _command_raises(monkeypatch, KeyboardInterrupt())
    assert main(["cluster", "status"]) == EXIT_INTERRUPTED == 130
    assert capsys.readouterr().err == "mtseg: interrupted\n"


def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch):
    _command_raises(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        main(["cluster", "status"])
