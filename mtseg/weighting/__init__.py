"""Task-weighting strategies: one file per method, one interface, named after the paper.

    strategy = build_weighting(cfg.weighting, task_names)
    weights = strategy.backward(losses, model.shared_parameters())   # replaces loss.backward()

See :mod:`mtseg.weighting.base` for the interface and the distributed design.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mtseg.weighting.base import WeightingStrategy, all_reduce_mean, sync_buffers, sync_gradients
from mtseg.weighting.dwa import DWAWeighting
from mtseg.weighting.equal import EqualWeighting
from mtseg.weighting.famo import FAMOWeighting
from mtseg.weighting.gradnorm import GradNormWeighting
from mtseg.weighting.pcgrad import PCGradWeighting
from mtseg.weighting.static import StaticWeighting
from mtseg.weighting.uncertainty import UncertaintyWeighting

if TYPE_CHECKING:
    from mtseg.config import WeightingConfig

# name -> builder from (weighting config, task names); one line per strategy.
STRATEGIES = {
    "equal": lambda c, names: EqualWeighting(names),
    "static": lambda c, names: StaticWeighting(names, {k: v for k, v in c.static.items() if k in names}),
    "uncertainty": lambda c, names: UncertaintyWeighting(names),
    "dwa": lambda c, names: DWAWeighting(names, temperature=c.dwa_temperature),
    "gradnorm": lambda c, names: GradNormWeighting(names, alpha=c.gradnorm_alpha, lr=c.gradnorm_lr, rep_grad=c.rep_grad),
    "pcgrad": lambda c, names: PCGradWeighting(names, rep_grad=c.rep_grad, batched=c.pcgrad_batched),
    "famo": lambda c, names: FAMOWeighting(names, lr=c.famo_lr, gamma=c.famo_gamma),
}
# Strategies with a representation-gradient mode (``weighting.rep_grad``).
REP_GRAD = ("gradnorm", "pcgrad")


def build_weighting(cfg: WeightingConfig, task_names: list[str]) -> WeightingStrategy:
    """Build the configured strategy.

    Args:
        cfg: ``cfg.weighting`` (name and the strategy's hyperparameters).
        task_names: the run's tasks, in the order of the losses.

    Returns:
        The strategy (an ``nn.Module``; move it to the device and checkpoint its state_dict).
    """
    if cfg.name not in STRATEGIES:
        raise ValueError(f"weighting.name: {cfg.name!r} is not one of {', '.join(STRATEGIES)}")
    if cfg.name in ("dwa", "gradnorm", "pcgrad", "famo") and len(task_names) < 2:
        raise ValueError(f"weighting.name: {cfg.name} needs at least two tasks, got {list(task_names)}")
    if cfg.rep_grad and cfg.name not in REP_GRAD:
        raise ValueError(f"weighting.rep_grad: only {' and '.join(REP_GRAD)} have it, not {cfg.name}")
    return STRATEGIES[cfg.name](cfg, list(task_names))


__all__ = [
    "STRATEGIES",
    "DWAWeighting",
    "EqualWeighting",
    "FAMOWeighting",
    "GradNormWeighting",
    "PCGradWeighting",
    "REP_GRAD",
    "StaticWeighting",
    "UncertaintyWeighting",
    "WeightingStrategy",
    "all_reduce_mean",
    "build_weighting",
    "sync_buffers",
    "sync_gradients",
]
