"""The shared interface: registry, equal and static weighting, checkpointable state, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtseg.config import WEIGHTING_NAMES, ConfigError, load_config
from mtseg.weighting import (
    REP_GRAD,
    STRATEGIES,
    EqualWeighting,
    StaticWeighting,
    all_reduce_mean,
    build_weighting,
    sync_gradients,
)

NAMES = ["a", "b"]


def test_registry_covers_every_config_name():
    assert set(STRATEGIES) == set(WEIGHTING_NAMES)
    for name in WEIGHTING_NAMES:
        cfg = load_config(None, [f"weighting.name={name}"])
        strategy = build_weighting(cfg.weighting, NAMES)
        assert strategy.task_names == NAMES


def test_build_errors():
    cfg = load_config(None, ["weighting.name=pcgrad"])
    with pytest.raises(ValueError, match="needs at least two tasks"):
        build_weighting(cfg.weighting, ["semantic"])
    cfg.weighting.name = "nope"
    with pytest.raises(ValueError, match="weighting.name"):
        build_weighting(cfg.weighting, NAMES)


def test_equal_matches_plain_backward(two_tasks):
    model, ref = two_tasks(), two_tasks()
    weights = EqualWeighting(NAMES).backward(model.losses(), [model.shared])
    sum(ref.losses().values()).backward()
    assert weights == {"a": 1.0, "b": 1.0}
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad)


def test_static_uses_config_weights_and_defaults_to_one(two_tasks):
    cfg = load_config(None, ["weighting.name=static", "weighting.static={semantic: 0.25, boundary: 3}"])
    strategy = build_weighting(cfg.weighting, ["semantic", "instance"])  # boundary not in this run
    model = two_tasks()
    losses = model.losses()
    weights = strategy.backward({"semantic": losses["a"], "instance": losses["b"]}, [model.shared])
    assert weights == {"semantic": 0.25, "instance": 1.0}
    ref = two_tasks()
    ref_losses = ref.losses()
    (0.25 * ref_losses["a"] + ref_losses["b"]).backward()
    assert torch.allclose(model.shared.grad, ref.shared.grad)
    with pytest.raises(ValueError, match="must be >= 0"):
        StaticWeighting(NAMES, {"a": -1.0})


def test_backward_rejects_mismatched_losses(two_tasks):
    model = two_tasks()
    with pytest.raises(ValueError, match="losses are for tasks"):
        EqualWeighting(["a", "c"]).backward(model.losses(), [model.shared])
    with pytest.raises(ValueError, match="must be a scalar"):
        EqualWeighting(["a"]).backward({"a": torch.ones(2, requires_grad=True)}, [model.shared])


@pytest.mark.parametrize("name", WEIGHTING_NAMES)
def test_state_dict_round_trip(name, two_tasks):
    cfg = load_config(None, [f"weighting.name={name}"])
    strategy = build_weighting(cfg.weighting, NAMES)
    model = two_tasks()
    opt = torch.optim.SGD(list(model.parameters()) + list(strategy.parameters()), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        strategy.backward(model.losses(), [model.shared])
        opt.step()
        strategy.on_epoch_end()
    state = strategy.state_dict()
    restored = build_weighting(cfg.weighting, NAMES)
    restored.load_state_dict(state)
    for key, value in restored.state_dict().items():
        assert torch.equal(value, state[key]), key
    # Same state -> same weights on the next step.
    a, b = two_tasks(), two_tasks()
    assert strategy.backward(a.losses(), [a.shared]) == restored.backward(b.losses(), [b.shared])


def test_distributed_helpers_are_no_ops_without_a_process_group():
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    sync_gradients([p])
    assert p.grad.tolist() == [3.0, 3.0]


def test_rep_grad_only_for_the_strategies_that_have_it():
    for name in REP_GRAD:
        assert build_weighting(load_config(None, [f"weighting.name={name}", "weighting.rep_grad=true"]).weighting, NAMES).rep_grad
    with pytest.raises(ConfigError, match="^weighting.rep_grad: only gradnorm and pcgrad have it, not equal$"):
        load_config(None, ["weighting.name=equal", "weighting.rep_grad=true"])
    cfg = load_config(None, ["weighting.name=dwa"])
    cfg.weighting.rep_grad = True
    with pytest.raises(ValueError, match="^weighting.rep_grad: only gradnorm and pcgrad have it, not dwa$"):
        build_weighting(cfg.weighting, NAMES)
