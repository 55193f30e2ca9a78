"""Parity between a reference (the final PyTorch model) and a runtime's outputs.

SQNR (signal-to-quantization-noise ratio, dB) is the headline: scale-free, so one threshold
(e.g. 40 dB for fp32 exports) works for logits and embeddings alike.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from edgeprep.errors import RuntimeFailure

# Identical outputs have infinite SQNR, which JSON cannot carry. ``parity`` clips SQNR to
# +/- SQNR_CAP_DB: float32 rounding noise alone already gives ~140 dB, so 200 dB means "no
# measurable error" and still compares correctly against any gate (inf >= 40 and 200 >= 40).
SQNR_CAP_DB = 200.0


class OutputMismatch(RuntimeFailure, ValueError):
    """A runtime returned outputs of another count or shape than the reference (exit 3): the artifact
    does not compute what its manifest says, so no parity number can be given."""


def _f64(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def sqnr_db(reference: Any, test: Any) -> float:
    """10 * log10(sum(ref^2) / sum((ref - test)^2)); +inf when identical, -inf for non-finite test."""
    ref, tst = _f64(reference), _f64(test)
    if ref.shape != tst.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {tst.shape}")
    if not np.all(np.isfinite(tst)):
        return -math.inf  # NaN/inf outputs: the worst possible parity, never a NaN that passes silently
    signal = float(np.sum(ref * ref))
    noise = float(np.sum((ref - tst) ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def max_abs(reference: Any, test: Any) -> float:
    ref, tst = _f64(reference), _f64(test)
    if ref.shape != tst.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {tst.shape}")
    return float(np.max(np.abs(ref - tst))) if ref.size else 0.0


def top1_agreement(ref_logits: Any, test_logits: Any) -> float:
    """Fraction of rows whose argmax over the last axis agrees."""
    ref, tst = np.asarray(ref_logits), np.asarray(test_logits)
    if ref.shape != tst.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs test {tst.shape}")
    return float(np.mean(np.argmax(ref, axis=-1) == np.argmax(tst, axis=-1)))


def parity(ref_outputs: Sequence[Any], test_outputs: Sequence[Any]) -> dict[str, Optional[float]]:
    """JSON-safe parity over all outputs: {"sqnr_db", "max_abs", "top1_agreement"}.

    SQNR pools signal and noise over every output; max_abs is the worst element anywhere (None
    when the test outputs hold NaN/inf, since JSON has no inf); top1_agreement is computed on the
    first output when it looks like logits (2-D, more than one class), else None.
    """
    fix = "the artifact does not compute its reference's outputs; re-export it"
    if len(ref_outputs) != len(test_outputs):
        raise OutputMismatch(f"the runtime returned {len(test_outputs)} outputs where the reference has "
                             f"{len(ref_outputs)}; {fix}")
    for i, (r, t) in enumerate(zip(ref_outputs, test_outputs)):
        if np.shape(r) != np.shape(t):
            raise OutputMismatch(f"output {i}: the runtime returned shape {np.shape(t)} where the reference has "
                                 f"{np.shape(r)}; {fix}")
    ref = np.concatenate([_f64(r).ravel() for r in ref_outputs]) if ref_outputs else np.zeros(0)
    tst = np.concatenate([_f64(t).ravel() for t in test_outputs]) if test_outputs else np.zeros(0)
    s = sqnr_db(ref, tst)
    finite = bool(np.all(np.isfinite(tst)))
    first = np.asarray(ref_outputs[0]) if ref_outputs else None
    top1 = (top1_agreement(ref_outputs[0], test_outputs[0])
            if first is not None and first.ndim == 2 and first.shape[1] > 1 else None)
    return {"sqnr_db": float(min(SQNR_CAP_DB, max(-SQNR_CAP_DB, s))),
            "max_abs": max_abs(ref, tst) if finite else None,
            "top1_agreement": top1}
