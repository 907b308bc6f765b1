"""Linear probe as in MAE (He et al. 2022): ``BatchNorm1d(affine=False)`` then ``nn.Linear``, trained with SGD.

MAE's recipe: the BatchNorm without affine parameters whitens each feature (so one learning rate suits any
backbone's feature scale) and folds into the linear layer at inference; weights start from a truncated normal
(std 0.01); the learning rate follows a per-step cosine schedule after a linear warm-up (10 of 100 epochs in
MAE, here the first ``WARMUP_FRACTION`` of steps). MAE uses LARS for its 16k batches; with few-shot supports
plain SGD with momentum is the appropriate optimiser. Runs on CPU: a linear layer on cached features is cheap.
This head is meant for larger supports (many shots or every label); with a handful of shots prefer ``logreg``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from fewshot.config import LinearConfig
from fewshot.heads.io import Head

WARMUP_FRACTION = 0.1
BN_EPS = 1e-6  # MAE's value


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore: a (B, D) x (D, C) layer is too small to split across threads,
    and on a busy 2-core machine two torch threads made training 10-20x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _probe(n_features: int, n_classes: int, generator: torch.Generator | None = None) -> nn.Sequential:
    """BatchNorm without affine parameters, then a linear layer initialised as in MAE."""
    linear = nn.Linear(n_features, n_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(n_features, affine=False, eps=BN_EPS), linear)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Shuffled index batches; a trailing batch of one joins the previous one (BatchNorm needs ≥2 rows)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches


@dataclass(kw_only=True, eq=False, repr=False)
class LinearHead(Head):
    """BatchNorm (no affine) + linear layer trained with SGD, as MAE's linear probe; seeded.

    Parameters
    ----------
    epochs, lr, batch_size, momentum, weight_decay : SGD over the support (warm-up then cosine learning rate).
    random_state : seed of the initialisation and the batch order.

    Attributes
    ----------
    module_ : the trained torch module (eval mode); ``final_loss_``: the last step's loss.
    """

    name: ClassVar[str] = "linear"
    config: ClassVar[type] = LinearConfig

    epochs: int = LinearConfig.epochs
    lr: float = LinearConfig.lr
    batch_size: int = LinearConfig.batch_size
    momentum: float = LinearConfig.momentum
    weight_decay: float = LinearConfig.weight_decay
    random_state: int = 0  # the episode's seed (make_head), not a config value

    def fit(self, X: ArrayLike, y: ArrayLike) -> Self:
        X, y = self._validate_fit(X, y)
        generator = torch.Generator().manual_seed(self.random_state)
        features = torch.from_numpy(X)  # (N, D)
        targets = torch.from_numpy(np.searchsorted(self.classes_, y))  # (N,) class indices 0..C-1
        module = _probe(X.shape[1], len(self.classes_), generator)
        optimizer = torch.optim.SGD(
            module.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        steps_per_epoch = math.ceil(len(X) / self.batch_size)
        if steps_per_epoch > 1 and len(X) % self.batch_size == 1:
            steps_per_epoch -= 1  # _batches merges a trailing batch of one
        total = self.epochs * steps_per_epoch
        warmup = int(WARMUP_FRACTION * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, warmup, total))
        loss_fn = nn.CrossEntropyLoss()
        module.train()
        with _one_thread():
            for _ in range(self.epochs):
                for batch in _batches(len(X), self.batch_size, generator):
                    loss = loss_fn(module(features[batch]), targets[batch])  # logits (B, C)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
        self.module_ = module.eval()
        self.final_loss_ = float(loss.detach())
        return self

    def decision_function(self, X: ArrayLike) -> np.ndarray:
        """The logits; ``predict`` (Head's) is their argmax."""
        features = torch.from_numpy(self._validate_predict(X))  # (Q, D)
        with torch.inference_mode(), _one_thread():
            return self.module_(features).numpy()  # (Q, C) logits

    def predict_proba(self, X: ArrayLike) -> np.ndarray:
        logits = torch.from_numpy(self.decision_function(X))  # (Q, C)
        return torch.softmax(logits, dim=1).numpy()

    def to_state(self) -> dict[str, np.ndarray]:
        params = self.module_.state_dict()
        return {
            "bn_mean": params["0.running_mean"].numpy(),
            "bn_var": params["0.running_var"].numpy(),
            "weight": params["1.weight"].numpy(),
            "bias": params["1.bias"].numpy(),
            "classes": self.classes_,
            "final_loss": np.asarray(self.final_loss_),
        }

    @classmethod
    def from_state(cls, params: Mapping[str, Any], state: Mapping[str, np.ndarray]) -> Self:
        head = cls(**params)
        weight = torch.from_numpy(np.asarray(state["weight"], dtype=np.float32))  # (C, D)
        module = _probe(weight.shape[1], weight.shape[0])
        module.load_state_dict(
            {
                "0.running_mean": torch.from_numpy(np.asarray(state["bn_mean"], dtype=np.float32)),
                "0.running_var": torch.from_numpy(np.asarray(state["bn_var"], dtype=np.float32)),
                "0.num_batches_tracked": torch.tensor(0),
                "1.weight": weight,
                "1.bias": torch.from_numpy(np.asarray(state["bias"], dtype=np.float32)),
            }
        )
        head.module_ = module.eval()
        head.classes_ = np.asarray(state["classes"])
        head.n_features_in_ = weight.shape[1]
        head.final_loss_ = float(state["final_loss"])
        return head


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then half-cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
