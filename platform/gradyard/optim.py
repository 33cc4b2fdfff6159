"""Optimizer, learning-rate schedule, loss and penalties, built from the job spec."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradyard.job import JobSpec


def build_optimizer(spec: JobSpec, model: nn.Module) -> torch.optim.Optimizer:
    o = spec.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)


def build_scheduler(spec: JobSpec, optimizer, total_steps: int):
    """A LambdaLR stepped once per optimizer step: warm-up, then the named schedule."""
    s = spec.schedule.lr_scheduler
    warm = s.warmup_steps
    total = max(1, total_steps)

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        t = step - warm
        span = max(1, total - warm)
        if s.name == "step":
            return s.gamma ** (t // s.step_size)
        if s.name == "exponential":
            return s.gamma ** t
        if s.name == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, t / span)))
        if s.name == "onecycle":
            # Rise for 30% of the run, then anneal to ~0 (Smith's one-cycle shape).
            up = max(1, int(0.3 * span))
            if t < up:
                return 0.04 + 0.96 * t / up
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - up) / max(1, span - up))))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def resolve_loss(spec: JobSpec, task: str) -> str:
    if spec.loss != "auto":
        return spec.loss
    return {"multiclass": "cross_entropy", "binary": "bce", "regression": "mse"}[task]


def build_loss(name: str) -> nn.Module:
    return {"cross_entropy": nn.CrossEntropyLoss(), "bce": nn.BCEWithLogitsLoss(),
            "mse": nn.MSELoss()}[name]


def penalty(spec: JobSpec, model: nn.Module) -> torch.Tensor | None:
    """L1 / L2 penalties over weight matrices and kernels (biases and norms excluded)."""
    r = spec.regularization
    if not (r.l1 or r.l2):
        return None
    total = None
    for p in model.parameters():
        if not p.requires_grad or p.dim() < 2:
            continue
        term = 0.0
        if r.l1:
            term = term + r.l1 * p.abs().sum()
        if r.l2:
            term = term + r.l2 * p.pow(2).sum()
        total = term if total is None else total + term
    return total
