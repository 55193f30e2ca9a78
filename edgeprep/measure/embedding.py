"""Embedding fidelity to a teacher, for sentence encoders with no labeled data offline.

- cosine: per sentence, cos(teacher_i, student_i); reported as mean and minimum.
- top-k retrieval overlap: for each sentence, its k nearest other sentences (cosine) among the set
  under the teacher and under the student; the overlap is |both| / k, averaged over sentences.
  1.0 means the student retrieves exactly the teacher's neighbours (order within the k ignored).
"""
from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [sentences, dim], got shape {x.shape}")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(teacher: np.ndarray, student: np.ndarray) -> np.ndarray:
    """Per-row cosine similarity of two [n, d] embedding matrices."""
    t, s = _unit(teacher), _unit(student)
    if t.shape != s.shape:
        raise ValueError(f"shape mismatch: teacher {t.shape} vs student {s.shape}")
    return np.sum(t * s, axis=1)


def neighbours(emb: np.ndarray, k: int) -> np.ndarray:
    """[n, k] indices of each row's k most similar other rows (ties broken by index, stable)."""
    u = _unit(emb)
    n = len(u)
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} sentences, got {k}")
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)  # a sentence is not its own neighbour
    # stable sort on -sim: equal similarities keep index order, so the result is deterministic
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def topk_overlap(teacher: np.ndarray, student: np.ndarray, k: int = 10) -> float:
    """Mean over sentences of |top-k(teacher) ∩ top-k(student)| / k."""
    if np.shape(teacher) != np.shape(student):
        raise ValueError(f"shape mismatch: teacher {np.shape(teacher)} vs student {np.shape(student)}")
    a, b = neighbours(teacher, k), neighbours(student, k)
    hits = [len(set(ra.tolist()) & set(rb.tolist())) for ra, rb in zip(a, b)]
    return float(np.mean(hits) / k)


def embedding_fidelity(teacher: np.ndarray, student: np.ndarray, k: int = 10) -> dict[str, float]:
    """{"mean_cosine", "min_cosine", "topk_overlap", "k"} of ``student`` against ``teacher``."""
    c = cosines(teacher, student)
    return {"mean_cosine": float(c.mean()), "min_cosine": float(c.min()),
            "topk_overlap": topk_overlap(teacher, student, k), "k": int(k)}
