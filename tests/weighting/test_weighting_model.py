"""Every strategy drives a real multi-task model (all five tasks) through one step."""

from __future__ import annotations

import pytest
import torch

from mtseg.config import TASK_NAMES, WEIGHTING_NAMES, load_config
from mtseg.data.categories import CategoryIndex
from mtseg.models import build_model
from mtseg.tasks import build_tasks, compute_losses, model_inputs
from mtseg.weighting import REP_GRAD, build_weighting
from mtseg.weighting.base import encoder_gradients, per_task_gradients, representation_gradients
from mtseg.weighting.gradnorm import last_shared_layer

CATEGORIES = CategoryIndex.from_categories([{"id": cid, "name": f"c{cid}", "supercategory": f"s{cid % 2}"} for cid in (1, 3, 8)])


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _batch(size=32):
    g = torch.Generator().manual_seed(0)
    semantic = torch.randint(0, CATEGORIES.num_classes, (2, size, size), generator=g)
    c2s = torch.tensor(CATEGORIES.class_to_super)
    return {
        "image": torch.rand(2, 3, size, size, generator=g),
        "semantic": semantic,
        "supercategory": c2s[semantic],
        "boundary": (torch.rand(2, size, size, generator=g) > 0.9).float(),
        "center": torch.rand(2, 1, size, size, generator=g) ** 8,
        "offset": torch.randn(2, 2, size, size, generator=g),
        "thing_mask": (semantic > 0).float(),
    }


def test_gradnorm_measures_the_decoders_last_layer():
    model = build_model(load_config(None, ["model.decoder_channels=16"]), CATEGORIES)
    assert last_shared_layer(model.shared_parameters()) is model.decoder.fuse[0].weight
    aspp = build_model(load_config(None, ["model.decoder=aspp", "model.decoder_channels=16"]), CATEGORIES)
    assert last_shared_layer(aspp.shared_parameters()) is aspp.decoder.fuse[0].weight


@pytest.mark.parametrize("name", WEIGHTING_NAMES)
def test_strategy_steps_the_multitask_model(name):
    cfg = load_config(None, [f"weighting.name={name}", "model.decoder_channels=16", "data.image_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg, CATEGORIES)
    tasks = build_tasks(cfg, CATEGORIES)
    strategy = build_weighting(cfg.weighting, list(tasks))
    batch = _batch()
    outputs = model(model_inputs(batch, tasks, cfg, generator=torch.Generator().manual_seed(0)))
    weights = strategy.backward(compute_losses(tasks, outputs, batch), model.shared_parameters())
    assert list(weights) == list(TASK_NAMES)
    assert all(isinstance(w, float) and w == w for w in weights.values())
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def _model_and_losses(cfg, *, representation: bool):
    torch.manual_seed(0)
    model = build_model(cfg, CATEGORIES)
    tasks = build_tasks(cfg, CATEGORIES)
    batch = _batch()
    inputs = model_inputs(batch, tasks, cfg, generator=torch.Generator().manual_seed(0))
    if representation:
        outputs, rep = model(inputs, representation=True)
        return model, compute_losses(tasks, outputs, batch), rep
    return model, compute_losses(tasks, model(inputs), batch), None


@pytest.mark.parametrize("batched", [True, False])
def test_per_task_gradients_through_the_representation_equal_full_backwards(batched):
    """Heads to the representation, then the encoder (batched or not): the same (T, P) as T full backwards."""
    cfg = load_config(None, ["model.decoder_channels=16", "data.image_size=32"])
    model, losses, _ = _model_and_losses(cfg, representation=False)
    params = model.shared_parameters()
    reference = per_task_gradients(list(losses.values()), params, accumulate_others=True)
    heads_reference = [p.grad.clone() for p in model.heads.parameters()]

    model, losses, (features, leaf) = _model_and_losses(cfg, representation=True)
    rep = representation_gradients(list(losses.values()), leaf)
    grads = encoder_gradients(features, rep, model.shared_parameters(), batched=batched)
    assert grads.shape == reference.shape == (len(TASK_NAMES), sum(p.numel() for p in params))
    assert torch.allclose(grads, reference, rtol=1e-5, atol=1e-7)
    for p, ref in zip(model.heads.parameters(), heads_reference):
        assert torch.allclose(p.grad, ref, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.shared_parameters())


def test_exact_pcgrad_writes_the_same_gradients_with_or_without_the_representation():
    cfg = load_config(None, ["weighting.name=pcgrad", "model.decoder_channels=16", "data.image_size=32"])
    grads, weights = [], []
    for representation in (False, True):
        model, losses, rep = _model_and_losses(cfg, representation=representation)
        strategy = build_weighting(cfg.weighting, list(losses))
        weights.append(strategy.backward(losses, model.shared_parameters(), rep))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert weights[0] == pytest.approx(weights[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", REP_GRAD)
def test_rep_grad_strategy_steps_the_multitask_model(name):
    cfg = load_config(
        None, [f"weighting.name={name}", "weighting.rep_grad=true", "model.decoder_channels=16", "data.image_size=32"]
    )
    model, losses, rep = _model_and_losses(cfg, representation=True)
    strategy = build_weighting(cfg.weighting, list(losses))
    assert strategy.uses_representation
    weights = strategy.backward(losses, model.shared_parameters(), rep)
    assert list(weights) == list(TASK_NAMES) and all(w == w for w in weights.values())
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    with pytest.raises(ValueError, match="weighting.rep_grad: the model passed no representation"):
        strategy.backward(_model_and_losses(cfg, representation=False)[1], model.shared_parameters())
