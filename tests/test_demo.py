"""The demo's hand-over (mtseg/demo.py): the best checkpoint, exported from the object store
into a local model directory, segments an image with the printed command and no store running."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest
import torch

from mtseg import storage
from mtseg.config import load_config, to_yaml
from mtseg.data.categories import CategoryIndex
from mtseg.data.synth import synthesize
from mtseg.demo import DEMO_CONFIG, export_model, predict_command
from mtseg.train import checkpoint as ckpt
from mtseg.train.loop import build_state


@pytest.mark.slow
def test_exported_model_segments_an_image_with_no_store(s3_bucket, tmp_path):
    info = synthesize(str(tmp_path / "coco"), train=0, val=2, size=32, seed=3)
    categories = CategoryIndex.from_categories(info["categories"])
    cfg = load_config(
        str(DEMO_CONFIG),
        [
            f"data.uri={s3_bucket}/shards",
            f"train.storage_path={s3_bucket}/runs",
            "model.backbone=mobilenet_v3_large",
            "model.decoder_channels=16",
            "data.image_size=32",
            "tasks.patch_size=4",
        ],
    )
    # A checkpoint as the trainer writes it (model, optimiser, schedule, ...), in the store.
    state = build_state(cfg, categories, 10, torch.device("cpu"))
    for group in state.optimizer.param_groups:  # one step, so that the optimiser has its state
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    state.optimizer.step()
    source = f"{s3_bucket}/runs/demo/checkpoint_000003"
    with tempfile.TemporaryDirectory() as d:
        ckpt.save(
            d,
            state.state_dict(),
            {**state.meta(), "metrics": {"val/miou": 0.5}, "categories": categories.to_categories()},
            to_yaml(cfg),
        )
        for name in os.listdir(d):
            with open(os.path.join(d, name), "rb") as f:
                storage.write_bytes(storage.join(source, name), f.read())
        training_bytes = os.path.getsize(os.path.join(d, ckpt.STATE_FILE))

    model_dir = export_model(source, str(tmp_path / "model"))
    assert sorted(os.listdir(model_dir)) == sorted([ckpt.STATE_FILE, ckpt.META_FILE, ckpt.CONFIG_FILE])
    meta = ckpt.verify(model_dir)
    assert meta["exported_from"] == source and meta["metrics"] == {"val/miou": 0.5}
    assert os.path.getsize(os.path.join(model_dir, ckpt.STATE_FILE)) < training_bytes / 2  # no optimiser state

    # The command the demo prints, pasted into a shell that cannot reach any store.
    with open(info["splits"]["val2017"]["annotation_file"]) as f:
        image = os.path.join(info["splits"]["val2017"]["image_dir"], json.load(f)["images"][0]["file_name"])
    out = tmp_path / "predict"
    command = predict_command(model_dir, image, out=str(out))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"})
    # Pasted where the demo ran: its paths are relative to that directory.
    done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"] == model_dir and len(summary["images"]) == 1 and not summary["skipped"]
    assert any(p.endswith(".png") for p in os.listdir(out))
