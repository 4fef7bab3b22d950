"""The multi-task model: every backbone x task set builds, runs at input resolution and back-propagates."""

from __future__ import annotations

import pytest
import torch

from mtseg.config import TASK_NAMES, load_config
from mtseg.data.categories import CategoryIndex
from mtseg.models import IMAGENET_MEAN, build_model
from mtseg.tasks import build_tasks, compute_losses, model_inputs
from mtseg.tasks.reconstruction import MASK_FILL
from mtseg.tasks.supercategory import hierarchical_log_probs

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


CATEGORIES = CategoryIndex.from_categories(
    [{"id": cid, "name": f"c{cid}", "supercategory": f"s{cid % 3}"} for cid in (1, 2, 5, 7, 9)]
)
TASK_SETS = {
    "semantic": ["semantic"],
    "hierarchy": ["semantic", "supercategory"],
    "all": list(TASK_NAMES),
}


def make_batch(b=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    semantic = torch.randint(0, CATEGORIES.num_classes, (b, size, size), generator=g)
    semantic[:, :4, :4] = 255
    c2s = torch.tensor(CATEGORIES.class_to_super + (255,) * (256 - CATEGORIES.num_classes))
    return {
        "image": torch.rand(b, 3, size, size, generator=g),
        "semantic": semantic,
        "supercategory": c2s[semantic],
        "boundary": (torch.rand(b, size, size, generator=g) > 0.9).float(),
        "center": torch.rand(b, 1, size, size, generator=g) ** 8,
        "offset": torch.randn(b, 2, size, size, generator=g),
        "thing_mask": (semantic > 0).float(),
        "image_id": torch.arange(b),
        "orig_size": torch.full((b, 2), size),
    }


def expected_channels(name):
    return {
        "semantic": CATEGORIES.num_classes,
        "supercategory": CATEGORIES.num_supercategories,
        "boundary": 1,
        "instance": 3,
        "reconstruction": 3,
    }[name]


def run_step(cfg, b=2, size=64):
    model = build_model(cfg, CATEGORIES)
    tasks = build_tasks(cfg, CATEGORIES)
    batch = make_batch(b, size)
    outputs = model(model_inputs(batch, tasks, cfg, train=True, generator=torch.Generator().manual_seed(0)))
    losses = compute_losses(tasks, outputs, batch)
    sum(losses.values()).backward()
    return model, outputs, losses


@pytest.mark.parametrize("task_set", list(TASK_SETS))
@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "resnet50", "mobilenet_v3_large"])
def test_every_backbone_and_task_set_backpropagates(backbone, task_set):
    names = TASK_SETS[task_set]
    cfg = load_config(None, [f"model.backbone={backbone}", f"tasks.names=[{','.join(names)}]", "model.decoder_channels=32"])
    model, outputs, losses = run_step(cfg)
    assert list(outputs) == names and list(losses) == names
    for name, out in outputs.items():
        assert out.shape == (2, expected_channels(name), 64, 64), name
        assert torch.isfinite(out).all(), name
        assert losses[name].ndim == 0 and torch.isfinite(losses[name]), name
    # DDP requires every parameter to take part in the forward of the chosen task set.
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert not unused
    assert {id(p) for p in model.shared_parameters()} | {id(p) for p in model.heads.parameters()} == {
        id(p) for p in model.parameters()
    }


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_aspp_decoder_all_tasks(backbone):
    cfg = load_config(None, [f"model.backbone={backbone}", "model.decoder=aspp", "model.decoder_channels=32"])
    model, outputs, _ = run_step(cfg, b=1)  # batch of one: the pooling branch has no BatchNorm
    assert outputs["semantic"].shape == (1, CATEGORIES.num_classes, 64, 64)
    assert all(p.grad is not None for p in model.parameters())


def test_channels_last_and_bf16_autocast():
    cfg = load_config(None, ["model.channels_last=true", "model.decoder_channels=32"])
    model = build_model(cfg, CATEGORIES)
    assert model.backbone.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    tasks = build_tasks(cfg, CATEGORIES)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(model_inputs(batch, tasks, cfg))
    losses = compute_losses(tasks, outputs, batch)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_hierarchical_log_probs_factorise_through_the_supercategory():
    g = torch.Generator().manual_seed(0)
    cat = torch.randn(2, CATEGORIES.num_classes, 3, 3, generator=g) * 30  # large logits: checks stability
    sup = torch.randn(2, CATEGORIES.num_supercategories, 3, 3, generator=g)
    c2s = torch.tensor(CATEGORIES.class_to_super)
    log_p = hierarchical_log_probs(cat, sup, c2s)
    assert torch.isfinite(log_p).all()
    p = log_p.exp()
    assert torch.allclose(p.sum(1), torch.ones(2, 3, 3), atol=1e-5)
    grouped = torch.zeros_like(sup).index_add_(1, c2s, p)
    assert torch.allclose(grouped, torch.softmax(sup, 1), atol=1e-5)
    # Within a supercategory the categories keep the softmax of their own logits.
    members = (c2s == 1).nonzero()[:, 0]
    assert torch.allclose(p[:, members] / grouped[:, 1:2], torch.softmax(cat[:, members], 1), atol=1e-5)


def test_model_semantic_output_is_tied_to_supercategory_output():
    c2s = torch.tensor(CATEGORIES.class_to_super)

    def grouped_and_super(hierarchical):
        cfg = load_config(
            None, ["tasks.names=[semantic,supercategory]", f"tasks.hierarchical={hierarchical}", "model.decoder_channels=16"]
        )
        model = build_model(cfg, CATEGORIES).eval()
        with torch.no_grad():
            out = model(torch.rand(2, 3, 32, 32))
        grouped = torch.zeros(2, CATEGORIES.num_supercategories, 32, 32).index_add_(1, c2s, torch.softmax(out["semantic"], 1))
        return grouped, torch.softmax(out["supercategory"], 1)

    # Tied at stride 4; bilinear upsampling of log-probabilities keeps it to within a hair.
    assert torch.allclose(*grouped_and_super(True), atol=2e-3)
    assert not torch.allclose(*grouped_and_super(False), atol=2e-3)


def test_model_rejects_bad_input():
    model = build_model(load_config(None, ["tasks.names=[semantic]", "model.decoder_channels=16"]), CATEGORIES)
    with pytest.raises(ValueError, match="expected float images"):
        model(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="expected float images"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_mask_fill_is_the_normalisation_mean():
    assert MASK_FILL == IMAGENET_MEAN


def test_default_config_builds_and_steps():
    """resnet18 + FPN(64) on 64 px: a smoke check that a step runs; the benchmark measures speed."""
    cfg = load_config(None, [])
    model, _, losses = run_step(cfg, b=4)
    assert set(losses) == set(TASK_NAMES)
