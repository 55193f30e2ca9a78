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


def mean_cosine(embeddings: np.ndarray, targets: np.ndarray) -> float:
    """Mean per-row cosine of [N, D] embeddings to [N, D] target embeddings (task "embedding")."""
    from edgeprep.measure.embedding import cosines

    if np.shape(embeddings) != np.shape(targets):
        raise BadInputError(f"the embedding metric needs outputs shaped like the targets; got "
                            f"{np.shape(embeddings)} for {np.shape(targets)}")
    return float(np.mean(cosines(targets, embeddings)))


def top10_overlap(embeddings: np.ndarray, targets: np.ndarray) -> float:
    """Retrieval agreement: each row's 10 nearest rows under the outputs vs under the targets."""
    from edgeprep.measure.embedding import topk_overlap

    return topk_overlap(targets, embeddings, k=min(10, len(targets) - 1))


# task -> (metric name, function(outputs[0], labels), higher is better)
METRICS: dict[str, tuple[str, Callable[[np.ndarray, np.ndarray], float]]] = {
    "classification": ("accuracy", accuracy),
    "embedding": ("mean_cosine", mean_cosine),  # labels: the original fp32 model's embeddings
}
# Reported beside the metric (no gate reads them): task -> {name: function(outputs[0], labels)}
EXTRA_METRICS: dict[str, dict[str, Callable[[np.ndarray, np.ndarray], float]]] = {
    "embedding": {"top10_overlap": top10_overlap},
}


def extra_metrics(task: str, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if len(labels) < 2:
        return {}
    return {name: fn(outputs, labels) for name, fn in EXTRA_METRICS.get(task, {}).items()}


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
