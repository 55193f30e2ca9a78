"""A toy plugin, registered from outside the package (EDGEPREP_PLUGINS=toy_plugin):

- a `noop` stage kind that changes nothing but records a decision and its own report section;
- an `npy` export target: an MLP's Linear weights as a .npz, run by a numpy runtime ("numpy").

An example, not a test: tests/test_plugins.py loads it and asserts that a new stage or target needs
no edit to any package file (recipe, run, --resume, report sections, `edgeprep noop`,
`edgeprep export -t npy`). Run it yourself with
`EDGEPREP_PLUGINS=toy_plugin PYTHONPATH=examples/plugins edgeprep noop --help`."""
from __future__ import annotations

from typing import Any, Literal, Mapping

import numpy as np
import torch
from pydantic import Field
from torch import nn

from edgeprep.errors import BadInputError
from edgeprep.exporters.base import Exporter, LoadedModel, Runtime
from edgeprep.exporters.options import ExportOptions
from edgeprep.manifest import describe_file
from edgeprep.recipe import StageConfig
from edgeprep.registry import StageSpec, TargetSpec, register_stage, register_target
from edgeprep.types import Artifact, TensorSpec

MARK_KIND = "noop_mark"


class NoopConfig(StageConfig):
    """Change nothing; record that the stage ran."""

    kind: Literal["noop"] = "noop"
    label: str = "hello"
    repeats: int = Field(1, ge=1)


class NoopStage:
    def __init__(self, config: NoopConfig):
        self.config = config

    def apply(self, model: Any, ctx: Any) -> Any:
        ctx.decisions.append({"kind": MARK_KIND, "label": self.config.label, "repeats": self.config.repeats})
        ctx.report.note(f"noop {self.config.label} x{self.config.repeats}: nothing changed")
        ctx.report.metrics["noop"] = {"label": self.config.label, "repeats": self.config.repeats}
        return model


def replay_mark(model: Any, decision: dict) -> Any:
    return model  # the mark changes no structure; replaying it must still be possible


def noop_sections(report: Mapping[str, Any]) -> list[Any]:
    from edgeprep.report_model import Section

    labels = [s["details"]["noop"]["label"] for s in report.get("stages", []) if s.get("kind") == "noop"]
    return [Section("Noop", text=[f"noop stage ran with label {label}" for label in labels])] if labels else []


register_stage(StageSpec("noop", NoopConfig, NoopStage, rank=None, replayers={MARK_KIND: replay_mark},
                         sections=noop_sections, help="Change nothing (a toy plugin stage)."))


# ----------------------------------------------------------------------------- the npy target
def mlp(in_features: int = 64, hidden: int = 32, classes: int = 10) -> nn.Module:
    """The model the npy target can run: Flatten -> Linear -> ReLU -> Linear (model.source
    "toy_plugin:mlp")."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


class NpyOptions(ExportOptions):
    target: Literal["npy"] = "npy"
    dtype: Literal["float32", "float64"] = Field("float32", description="the dtype the weights are stored in")


class NpyExporter(Exporter):
    target = "npy"
    runtime = "numpy"
    options_model = NpyOptions

    def export(self, model: Any, example_inputs: tuple[Any, ...], out_dir: Any, options: Any) -> Artifact:
        opts = NpyOptions.of(options)
        layers = [m for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Flatten, nn.ReLU))]
        if not all(isinstance(m, nn.Linear) for m in layers):
            raise BadInputError("npy: only Flatten / Linear / ReLU models export to npy")
        arrays = {}
        for i, lin in enumerate(layers):
            arrays[f"w{i}"] = lin.weight.detach().numpy().astype(opts.dtype)
            arrays[f"b{i}"] = lin.bias.detach().numpy().astype(opts.dtype)
        path = out_dir / "model.npz"
        np.savez(path, **arrays)
        shape = ("batch", *example_inputs[0].shape[1:])
        return describe_file(opts.artifact_name, "npy", "numpy", path, [TensorSpec("x", shape, "float32")],
                             [TensorSpec("logits", ("batch", layers[-1].out_features), "float32")],
                             info={"layers": len(layers), "dtype": opts.dtype})


class NumpyLoaded(LoadedModel):
    input_names, output_names = ("x",), ("logits",)

    def __init__(self, path: Any, threads: int):
        with np.load(path) as z:
            n = len([k for k in z.files if k.startswith("w")])
            self.layers = [(z[f"w{i}"], z[f"b{i}"]) for i in range(n)]
        self.threads = threads

    def run(self, inputs: Any) -> list:
        h = np.asarray(inputs[0], dtype=np.float64).reshape(len(inputs[0]), -1)
        for i, (w, b) in enumerate(self.layers):
            h = h @ w.T.astype(np.float64) + b
            if i < len(self.layers) - 1:
                h = np.maximum(h, 0.0)
        return [h.astype(np.float32)]


class NumpyRuntime(Runtime):
    name, package = "numpy", "numpy"

    def load(self, artifact: Artifact, threads: int = 1) -> LoadedModel:
        return NumpyLoaded(artifact.path, threads)


def npy_sections(arts: list) -> list[Any]:
    from edgeprep.report_model import Section

    mine = [a for a in arts if a.get("target") == "npy"]
    return [Section("npy artifacts", text=[f"{a['name']}: {a['bytes']} bytes of numpy weights" for a in mine])] if mine else []


register_target(TargetSpec("npy", NpyOptions, NpyExporter, "numpy", NumpyRuntime, sections=npy_sections,
                           help="Linear weights as .npz, run with numpy (a toy plugin target)."))
