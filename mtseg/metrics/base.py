"""The accumulator shared by the count-based metrics: one tensor of sums.

Sums add, so workers' results combine exactly: ``merge`` in one process, ``all_reduce``
over torch.distributed, ``state_dict`` / ``from_state`` between Ray actors.
"""

from __future__ import annotations

from typing import Any

import torch

from mtseg.metrics._dist import all_reduce_sum


class SumMetric:
    """Base class: one tensor of sums with reset / merge / all_reduce / state_dict.

    Subclasses define ``_empty_state()``, ``_config()`` (constructor keyword arguments), an
    ``update`` that adds to ``self._state_on(device)``, and ``compute()``.
    """

    _state: torch.Tensor

    def _empty_state(self) -> torch.Tensor:
        raise NotImplementedError

    def _config(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget everything accumulated so far."""
        self._state = self._empty_state()

    def _state_on(self, device: torch.device) -> torch.Tensor:
        # Sums follow the data (GPU during training) so updates never copy batches to the host.
        if self._state.device != device:
            self._state = self._state.to(device)
        return self._state

    def merge(self, other: SumMetric) -> None:
        """Add the sums of ``other`` (same class, same constructor arguments) to this metric."""
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"merge: cannot merge {type(other).__name__}{other._config()} into {type(self).__name__}{self._config()}"
            )
        self._state += other._state.to(self._state.device)

    def all_reduce(self) -> None:
        """Sum the state over all torch.distributed ranks (no-op without a process group)."""
        self._state = all_reduce_sum(self._state)

    def state_dict(self) -> dict[str, Any]:
        """Constructor arguments plus ``"state"`` (the sums on the CPU); picklable."""
        return {**self._config(), "state": self._state.detach().cpu().clone()}

    @classmethod
    def from_state(cls, state: dict[str, Any]):
        """A new metric holding the sums of :meth:`state_dict` output ``state``."""
        state = dict(state)
        sums = torch.as_tensor(state.pop("state"))
        metric = cls(**state)
        if tuple(sums.shape) != tuple(metric._state.shape):
            raise ValueError(f"from_state: state shape {tuple(sums.shape)} != expected {tuple(metric._state.shape)}")
        metric._state = sums.to(metric._state.dtype).clone()
        return metric
