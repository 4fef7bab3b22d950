"""benchmarks/gpu.py's CPU smoke, in process, so the GPU script cannot rot between GPU runs.

The phases that start Ray (stream, evaluate) run in ``make bench``; torch.compile only on a GPU.
"""

from __future__ import annotations

import json

import torch


def test_cpu_smoke_trains_both_models_counts_their_flops_and_says_it_is_a_smoke(tmp_path, load_benchmark):
    gpu = load_benchmark("gpu")
    out = tmp_path / "gpu.json"
    threads = torch.get_num_threads()
    try:
        figures = gpu.main(
            [
                "--smoke",
                "--phases",
                "in_memory,anchor,flops",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--resident-batches",
                "2",
                "--out",
                str(out),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == figures
    assert figures["smoke"] is True and figures["device"] == "cpu" and figures["errors"] == {}
    assert figures["img_per_s"] > 0 and figures["anchor_img_per_s"] > 0
    assert figures["compile"]["off"]["img_per_s"] == figures["img_per_s"] and figures["compile"]["on"] is None
    # DeepLabV3's dilated ResNet-50 (output stride 8) costs more per image than the FPN's stride-32 one.
    assert figures["flops_per_step"]["anchor"] > figures["flops_per_step"]["multitask"] > 0
    assert figures["mfu"] is None  # no bf16 peak for a CPU
    assert set(figures["goals"]) == {"multitask_over_anchor", "mfu", "stream_over_in_memory"}
    assert all(g["met"] is None for g in figures["goals"].values())  # a smoke meets or misses nothing


def test_bf16_peak_table_knows_the_gpus_of_the_goal(load_benchmark):
    gpu = load_benchmark("gpu")
    assert gpu.bf16_peak_flops("NVIDIA H100 80GB HBM3") == gpu.bf16_peak_flops("NVIDIA H200") == 989e12
    assert gpu.bf16_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.bf16_peak_flops("Tesla T4") is None
