"""Structural pruning of Hugging Face BERT layers: real transformers models (built from a config,
never downloaded), checked against transformers' own head pruning, a hand-built reference for
neurons, replay of the decisions, exact cost accounting, and ONNX Runtime parity of the export."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from edgeprep.checkpoint import replay_decision  # noqa: E402
from edgeprep.errors import BadInputError  # noqa: E402
from edgeprep.measure.cost import count_macs  # noqa: E402
from edgeprep.pruning.bert import (  # noqa: E402
    BERT_HEADS_KIND,
    BERT_MLP_KIND,
    apply_bert_decision,
    prune_bert_heads,
    prune_bert_mlp,
)
from edgeprep.pruning.engine import PruneSettings, prune_model  # noqa: E402

HIDDEN, HEADS, INTER, LAYERS, SEQ, LABELS = 64, 4, 128, 2, 16, 3
HEAD_DIM = HIDDEN // HEADS
LAYER = "bert.encoder.layer.{}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add overhead, and on a loaded 2-CPU machine
    OpenMP spin-waits made one prune_model run take ~30 s with 2 threads versus <1 s with one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(seed: int = 0, attn: str = "eager") -> torch.nn.Module:
    """A tiny seeded BertForSequenceClassification in eval mode.

    Eager attention by default (``test_sdpa_attention_macs_are_counted`` shows count_macs gives the
    same total for transformers' default SDPA attention, whose CPU kernel torch's counter lacks).
    Every parameter is then redrawn from a seeded normal: BERT's own init zeroes all biases and sets
    LayerNorm to (1, 0), which would let a wrong bias slice pass unseen, and its 0.02 weights keep the
    logits so small that removing the wrong heads moves them by only ~2e-4."""
    config = transformers.BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, intermediate_size=INTER,
                                     max_position_embeddings=32, num_labels=LABELS, attn_implementation=attn)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1
            p.copy_(1.0 + noise if "LayerNorm.weight" in name else noise)
    return model.eval()


def tokens(batch: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 token ids and an attention mask whose last row is padded (the mask path really runs)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, SEQ), generator=gen)
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    mask[-1, SEQ - 5:] = 0
    return ids, mask


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class TokenCalibration:
    """Seeded random token batches with random labels; the loss is cross-entropy on the logits."""

    def __init__(self, batch_size: int = 8, seed: int = 0):
        self.batch_size, self.seed = batch_size, seed

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + i)
        ids = torch.randint(0, 100, (self.batch_size, SEQ), generator=gen)
        mask = torch.ones(self.batch_size, SEQ, dtype=torch.long)
        mask[0, SEQ - 4:] = 0
        labels = torch.randint(0, LABELS, (self.batch_size,), generator=gen)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return model(**self.inputs(batch))

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(model(**self.inputs(batch)).logits, batch["labels"])


def mac_counter(ids: torch.Tensor):
    return lambda m: count_macs(m, (ids[:1],))


SETTINGS = dict(ratio=0.3, importance="taylor", schedule="incremental", ratio_per_stage=0.1,
                allocation="adaptive", seed=0)


@pytest.fixture(scope="module")
def pruned_params():
    """One Adapt-Pruner run on the params budget, shared (read-only) by the replay and ONNX tests."""
    model = build(0)
    ids, _ = tokens()
    before = params(model)
    outcome = prune_model(model, PruneSettings(budget="params", **SETTINGS), TokenCalibration(),
                          run_macs=mac_counter(ids))
    return model, outcome, before


def kept_counts(model: torch.nn.Module) -> list[tuple[int, int]]:
    out = []
    for i in range(LAYERS):
        layer = model.get_submodule(LAYER.format(i))
        out.append((layer.attention.self.num_attention_heads, layer.intermediate.dense.out_features))
    return out


# ----------------------------------------------------------------------------- exact references
def test_head_pruning_matches_transformers_prune_heads():
    ours, theirs = build(0), build(0)
    ids, mask = tokens()
    full = logits(ours, ids, mask)

    decision = prune_bert_heads(ours, LAYER.format(0), [2, 0])
    theirs.prune_heads({0: [1, 3]})  # transformers takes the heads to remove

    assert decision == {"kind": BERT_HEADS_KIND, "block": LAYER.format(0), "keep": [0, 2]}
    sa = ours.get_submodule(LAYER.format(0)).attention.self
    assert (sa.num_attention_heads, sa.all_head_size) == (2, 2 * HEAD_DIM)
    for name in ("query", "key", "value"):
        lin = getattr(sa, name)
        assert tuple(lin.weight.shape) == (2 * HEAD_DIM, HIDDEN) and tuple(lin.bias.shape) == (2 * HEAD_DIM,)
    assert tuple(ours.get_submodule(LAYER.format(0)).attention.output.dense.weight.shape) == (HIDDEN, 2 * HEAD_DIM)
    assert params(ours) == params(theirs) == params(build(0)) - 2 * HEAD_DIM * (3 * (HIDDEN + 1) + HIDDEN)

    got, want = logits(ours, ids, mask), logits(theirs, ids, mask)
    diff = (got - want).abs().max().item()
    assert diff <= 1e-5, diff
    assert (got - full).abs().max().item() > 1e-2  # removing two of four heads really changed the output
    wrong = build(0)
    prune_bert_heads(wrong, LAYER.format(0), [0, 1])  # negative control: the tolerance tells heads apart
    assert (logits(wrong, ids, mask) - want).abs().max().item() > 1e-3


def test_neuron_pruning_matches_zeroed_reference():
    ours, ref = build(0), build(0)
    ids, mask = tokens()
    gen = torch.Generator().manual_seed(3)
    keep = sorted(torch.randperm(INTER, generator=gen)[:50].tolist())
    gone = torch.tensor(sorted(set(range(INTER)) - set(keep)))

    decision = prune_bert_mlp(ours, LAYER.format(1), list(reversed(keep)))
    with torch.no_grad():  # GELU(0) = 0: a neuron with zero weights and bias contributes nothing
        fc1 = ref.get_submodule(LAYER.format(1)).intermediate.dense
        fc1.weight[gone] = 0.0
        fc1.bias[gone] = 0.0

    assert decision == {"kind": BERT_MLP_KIND, "block": LAYER.format(1), "keep": keep}
    layer = ours.get_submodule(LAYER.format(1))
    assert tuple(layer.intermediate.dense.weight.shape) == (50, HIDDEN)
    assert tuple(layer.output.dense.weight.shape) == (HIDDEN, 50)
    assert params(build(0)) - params(ours) == (INTER - 50) * (HIDDEN + 1 + HIDDEN)

    diff = (logits(ours, ids, mask) - logits(ref, ids, mask)).abs().max().item()
    assert diff <= 1e-5, diff


def test_decisions_replay_on_a_fresh_model():
    model, fresh = build(0), build(0)
    decisions = [prune_bert_heads(model, LAYER.format(0), [1, 3]),
                 prune_bert_heads(model, LAYER.format(1), [0, 1, 2]),
                 prune_bert_mlp(model, LAYER.format(0), list(range(0, INTER, 2)))]
    for d in decisions:
        apply_bert_decision(fresh, d)
    fresh.load_state_dict(model.state_dict(), strict=True)
    ids, mask = tokens()
    assert torch.equal(logits(model, ids, mask), logits(fresh, ids, mask))


# ----------------------------------------------------------------------------- the engine on BERT
def test_prune_model_params_budget_and_replay(pruned_params):
    model, outcome, before = pruned_params
    after = params(model)
    removed = 1 - after / before
    assert abs(removed - 0.3) <= 0.02, removed
    assert after == outcome.cost_after_planned  # the engine's per-unit param costs are exact
    assert outcome.cost_before == before
    assert [h["stage"] for h in outcome.history] == [1, 2, 3]
    counts = kept_counts(model)
    assert all(h >= 1 and n >= 1 for h, n in counts), counts
    assert sum(h for h, _ in counts) < LAYERS * HEADS or sum(n for _, n in counts) < LAYERS * INTER

    ids, mask = tokens()
    out = logits(model, ids, mask)
    assert out.shape == (2, LABELS) and torch.isfinite(out).all()

    # Kept indices are relative to the input model: replaying them on the same fresh model rebuilds the
    # pruned model exactly, even before its weights are loaded (no training happened in between).
    assert {d["kind"] for d in outcome.decisions} <= {BERT_HEADS_KIND, BERT_MLP_KIND}
    fresh = build(0)
    for d in outcome.decisions:
        replay_decision(fresh, d)
    assert kept_counts(fresh) == counts
    assert (logits(fresh, ids, mask) - out).abs().max().item() == 0.0
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert (logits(fresh, ids, mask) - out).abs().max().item() == 0.0


def test_prune_model_macs_budget():
    model = build(0)
    ids, _ = tokens()
    run_macs = mac_counter(ids)
    before = run_macs(model)
    outcome = prune_model(model, PruneSettings(budget="macs", **SETTINGS), TokenCalibration(), run_macs=run_macs)
    after = run_macs(model)
    removed = 1 - after / before
    assert abs(removed - 0.3) <= 0.02, removed
    assert after == outcome.cost_after_planned  # eager attention: every budgeted MAC is a counted op
    assert all(h >= 1 and n >= 1 for h, n in kept_counts(model))


# ----------------------------------------------------------------------------- ONNX export
class LogitsOnly(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _export(module: torch.nn.Module, args: tuple, path) -> str:
    kw = dict(input_names=["input_ids", "attention_mask"], output_names=["logits"])
    try:
        torch.onnx.export(module, args, str(path), dynamo=True, **kw)
        return "dynamo"
    except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter, but say so
        warnings.warn(f"dynamo ONNX export of BERT failed ({type(exc).__name__}: {exc}); using dynamo=False")
        torch.onnx.export(module, args, str(path), dynamo=False, **kw)
        return "torchscript"


@pytest.mark.slow
def test_pruned_bert_onnx_runtime_parity(pruned_params, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, _, _ = pruned_params
    ids, mask = tokens()
    wrapper = LogitsOnly(model).eval()
    want = logits(model, ids, mask).numpy()

    path = tmp_path / "bert_pruned.onnx"
    _export(wrapper, (ids, mask), path)  # warns if it had to fall back to the TorchScript exporter

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    diff = float(np.abs(got - want).max())
    assert got.shape == (2, LABELS)
    assert diff <= 1e-4, diff

    # The graph holds the smaller weights. Exporters may transpose or rename a Linear weight, so compare
    # shapes as unordered pairs: every Linear of the pruned model must be there with its pruned shape.
    graph = onnx.load(str(path)).graph
    shapes = Counter(tuple(sorted(t.dims)) for t in graph.initializer if len(t.dims) == 2)
    linears = Counter(tuple(sorted(m.weight.shape)) for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert not linears - shapes, (linears - shapes, shapes)
    for h, n in kept_counts(model):
        assert shapes[tuple(sorted((h * HEAD_DIM, HIDDEN)))] >= 4  # query, key, value, attention output
        assert shapes[tuple(sorted((n, HIDDEN)))] >= 2  # intermediate, output
    if all(n < INTER for _, n in kept_counts(model)):
        assert shapes[(HIDDEN, INTER)] == 0  # no unpruned intermediate weight left anywhere
    # Where the exporter keeps a query bias under its parameter name, its length is the kept width.
    for i, (h, _) in enumerate(kept_counts(model)):
        for t in graph.initializer:
            if t.name.endswith(f"{LAYER.format(i)}.attention.self.query.bias"):
                assert list(t.dims) == [h * HEAD_DIM]


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("keep", [[], [0, HEADS], [-1], [1, 1]])
def test_prune_bert_heads_rejects_bad_keep(keep):
    model = build(0)
    with pytest.raises(BadInputError):
        prune_bert_heads(model, LAYER.format(0), keep)
    assert model.get_submodule(LAYER.format(0)).attention.self.num_attention_heads == HEADS  # untouched


def test_prune_bert_mlp_and_paths_reject_bad_input():
    model = build(0)
    with pytest.raises(BadInputError):
        prune_bert_mlp(model, LAYER.format(0), [INTER])
    with pytest.raises(BadInputError):
        prune_bert_heads(model, "bert.encoder.layer.7", [0])
    with pytest.raises(BadInputError):
        prune_bert_heads(model, "bert.pooler", [0])  # a module, but not a BERT layer
    with pytest.raises(BadInputError):
        apply_bert_decision(model, {"kind": BERT_HEADS_KIND, "block": LAYER.format(0), "keep": "0,1"})


def test_sdpa_attention_macs_are_counted():
    ids, _ = tokens(1)
    eager, sdpa = count_macs(build(attn="eager"), (ids,)), count_macs(build(attn="sdpa"), (ids,))
    # Attention matmuls per layer: 2 * seq^2 * hidden MACs; without the CPU SDPA formula they vanish.
    assert eager == sdpa and eager > LAYERS * 2 * SEQ * SEQ * HIDDEN
