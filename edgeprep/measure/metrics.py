"""Task metrics, computed the same way from PyTorch outputs and from a runtime's outputs."""
from __future__ import annotations

from typing import Callable

import numpy as np

from edgeprep.errors import BadInputError


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of [N, C] logits against [N] integer labels."""
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise BadInputError(f"accuracy needs [N, C] logits for N labels; got {logits.shape} for {labels.shape}")
    return float((logits.argmax(axis=1) == labels).mean())


# task -> (metric name, function(outputs[0], labels), higher is better)
METRICS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], float]]] = {
    "classification": ("accuracy", accuracy),
}


def metric_for(task: str) -> tuple[str, Callable[[np.ndarray, np.ndarray], float]]:
    if task not in METRICS:
        raise BadInputError(f"no metric for task {task!r}; known tasks: {', '.join(sorted(METRICS))}")
    return METRICS[task]


def torch_outputs(model, x, batch_size: int = 256) -> np.ndarray:
    """Run an eval-mode torch model over ``x`` in batches; return the first output as numpy."""
    import torch

    from edgeprep.train import logits_of

    outs = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                outs.append(logits_of(model(x[i:i + batch_size])).detach().float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(outs, axis=0)
