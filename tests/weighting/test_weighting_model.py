"""Every strategy drives a real multi-task model (all five tasks) through one step."""

from __future__ import annotations

import pytest
import torch

from mtseg.config import TASK_NAMES, WEIGHTING_NAMES, load_config
from mtseg.data.categories import CategoryIndex
from mtseg.models import build_model
from mtseg.tasks import build_tasks, compute_losses, model_inputs
from mtseg.weighting import build_weighting
from mtseg.weighting.gradnorm import last_shared_layer

CATEGORIES = CategoryIndex.from_categories(
    [{"id": cid, "name": f"c{cid}", "supercategory": f"s{cid % 2}"} for cid in (1, 3, 8)]
)


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
