"""Optimiser and learning-rate schedule: SGD / AdamW, linear warm-up then poly or cosine decay."""

from __future__ import annotations

import math

import torch

from mtseg.config import TrainConfig


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov momentum) or AdamW over ``params`` (an iterable of tensors or param groups)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    # The fused kernel: torch's default on CPU is a Python loop over the parameters, which took
    # a quarter of the demo's step time (resnet18: ~90 ms per step against ~20 ms fused).
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def lr_factor(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Multiplier of the base LR at optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return (1.0 - progress) ** 0.9  # poly, as in DeepLab


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimiser-step LambdaLR; its state (last_epoch) is checkpointed with the optimiser."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
