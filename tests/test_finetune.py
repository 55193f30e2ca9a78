"""The finetune stage: trains or distils through the shared loop and reports what it did."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from edgeprep.context import Context, StageReport
from edgeprep.data import DataBundle, Split
from edgeprep.errors import BadInputError, TrainingDivergedError
from edgeprep.recipe import DistillConfig, FinetuneConfig, StageConfig, TrainConfig, TrainOverrides
from edgeprep.stages import get_stage
from edgeprep.stages.finetune import FinetuneStage


def _split(n: int, seed: int) -> Split:
    centres = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(99)) * 2.0
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    return Split(x=centres[y] + torch.randn(n, 1, 4, 4, generator=g), y=y)


def bundle(n_val: int = 128) -> DataBundle:
    train = _split(384, seed=1)
    return DataBundle(name="blobs", task="classification", num_classes=4, input_shape=(1, 4, 4),
                      train=train, val=_split(n_val, seed=2), test=_split(64, seed=3), calib=train.x[:16])


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def context(data: DataBundle, **kw) -> Context:
    defaults = TrainConfig(steps=30, batch_size=32, lr=1e-2, warmup_steps=3)
    return Context(data=data, train=defaults, example_inputs=(data.test.x[:2],), seed=0, progress=False,
                   report=StageReport(kind="finetune"), **kw)


def test_finetune_trains_and_reports():
    ctx = context(bundle())
    out = FinetuneStage(FinetuneConfig()).apply(model(), ctx)
    metrics = ctx.report.metrics
    assert out.training is False
    assert metrics["steps"] == 30 and metrics["seconds"] > 0
    assert metrics["final_loss"] < 0.2  # measured 0.002
    assert metrics["val_accuracy"] > 0.9  # measured 1.0
    assert any("trained 30 steps x 32 samples" in n for n in ctx.report.notes)
    assert not any("no validation split" in n for n in ctx.report.notes)


def test_stage_overrides_win_over_recipe_defaults():
    ctx = context(bundle())
    FinetuneStage(FinetuneConfig(train=TrainOverrides(steps=5, eval_every=2))).apply(model(), ctx)
    assert ctx.report.metrics["steps"] == 5
    curve = ctx.report.metrics["val_accuracy_curve"]
    assert [step for step, _ in curve] == [2, 4] and all(0 <= acc <= 1 for _, acc in curve)


def test_distill_from_teacher_and_note(tmp_path):
    student = model()
    teacher = copy.deepcopy(student).eval()
    ctx = context(bundle(), teacher=teacher, stage_dir=tmp_path)
    cfg = FinetuneConfig(distill=DistillConfig(temperature=2.0, alpha=0.5), train=TrainOverrides(steps=5))
    FinetuneStage(cfg).apply(student, ctx)
    assert any("T=2 alpha=0.5" in n for n in ctx.report.notes)
    assert not (tmp_path / "last_good.safetensors").exists()  # written only on divergence by default


def test_distill_without_teacher_is_bad_input():
    ctx = context(bundle())
    with pytest.raises(BadInputError, match="no teacher"):
        FinetuneStage(FinetuneConfig(distill=DistillConfig())).apply(model(), ctx)


def test_divergence_keeps_last_good_weights_in_stage_dir(tmp_path):
    ctx = context(bundle(), stage_dir=tmp_path)
    net = model()
    with pytest.raises(TrainingDivergedError, match="finetune diverged"):
        FinetuneStage(FinetuneConfig(train=TrainOverrides(lr=1e30, warmup_steps=0))).apply(net, ctx)
    saved = load_file(tmp_path / "last_good.safetensors")
    assert saved.keys() == net.state_dict().keys()
    assert all(torch.equal(saved[k], v) and torch.isfinite(v).all() for k, v in net.state_dict().items())


def test_no_val_split_is_noted_not_fatal():
    ctx = context(bundle(n_val=0))
    FinetuneStage(FinetuneConfig(train=TrainOverrides(steps=3))).apply(model(), ctx)
    assert "val_accuracy" not in ctx.report.metrics
    assert any("no validation split" in n for n in ctx.report.notes)


def test_registry_has_every_kind_and_unknown_kinds_list_valid_ones():
    from edgeprep.recipe import stage_kinds
    from edgeprep.registry import stage_specs
    from edgeprep.stages.binarize import BinarizeStage
    from edgeprep.stages.prune import PruneStage
    from edgeprep.stages.qat import QatStage
    from edgeprep.stages.reparam import ReparamStage

    classes = {k: spec.stage.resolve() for k, spec in stage_specs().items()}
    assert classes == {"finetune": FinetuneStage, "prune": PruneStage, "reparam": ReparamStage, "qat": QatStage,
                       "binarize": BinarizeStage}
    assert stage_kinds() == ("finetune", "prune", "reparam", "qat", "binarize")  # registry order
    assert all(spec.config.model_fields["kind"].default == k for k, spec in stage_specs().items())
    assert isinstance(get_stage(FinetuneConfig()), FinetuneStage)
    with pytest.raises(BadInputError, match="unknown stage kind 'distill'; valid kinds: finetune, prune, reparam, "
                                            "qat, binarize"):
        get_stage(StageConfig(kind="distill"))


def test_training_stages_refuse_non_classification_data_in_one_line():
    from types import SimpleNamespace

    from edgeprep.context import Context
    from edgeprep.recipe import PruneConfig, QatConfig, TrainConfig

    ctx = Context(data=SimpleNamespace(task="regression"), train=TrainConfig(), example_inputs=())
    for cfg, fix in ((FinetuneConfig(), "remove the finetune stage"),
                     (PruneConfig(pruning_ratio=0.5), "edgeprep.pruning.engine"),
                     (QatConfig(), "edgeprep.quant.intervention")):
        with pytest.raises(BadInputError, match=rf"^stage {cfg.kind} .*; the data is a 'regression' task; .*{fix}"):
            get_stage(cfg).apply(torch.nn.Linear(2, 2), ctx)
