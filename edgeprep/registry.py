"""The extension points: one ``StageSpec`` per stage kind and one ``TargetSpec`` per export target.

Everything that needs to know a kind or a target reads these registries: recipe validation (the
stage configs and their order rules, the export options), checkpoint replay, the report's
sections, ``doctor`` and the CLI's per-stage and ``export`` options. Adding a technique or a target
is one ``register_stage`` / ``register_target`` call, in the package's registry list
(``edgeprep.builtin``) or in a plugin module.

Plugins: a module named in ``EDGEPREP_PLUGINS`` (comma-separated import paths) or exposed under
the ``edgeprep.plugins`` entry-point group is imported once, before the registries are first
read, so its registrations reach every command and every process (``torchrun`` workers, the CLI).

This module imports nothing of edgeprep but its errors, so any module may import it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from edgeprep.errors import BadInputError

PLUGINS_ENV = "EDGEPREP_PLUGINS"
PLUGIN_ENTRY_POINTS = "edgeprep.plugins"

# decision dict -> the module with that decision's structure applied (checkpoint replay)
Replayer = Callable[[Any, dict], Any]
# report.json (a mapping) -> report sections (edgeprep.report_model.Section); none when not relevant
SectionProvider = Callable[[Mapping[str, Any]], Sequence[Any]]


@dataclass(frozen=True)
class StageSpec:
    """One stage kind. ``config`` is a pydantic model with ``kind: Literal[<kind>]``; ``stage`` is
    called with a config and returns an object whose ``apply(model, ctx)`` returns the new model."""

    kind: str
    config: type
    stage: Callable[[Any], Any]
    # order: a ranked stage comes after every stage of a lower rank (None: anywhere, like finetune)
    rank: Optional[int] = None
    conflicts: frozenset[str] = frozenset()  # kinds that cannot share a recipe or a checkpoint with it
    requires: tuple[str, ...] = ()  # kinds that must have run before it
    replayers: Mapping[str, Replayer] = field(default_factory=dict)  # decision kind -> replayer
    sections: Optional[SectionProvider] = None  # its report.md / .html sections
    # CLI: `edgeprep <kind>` options generated from ``config``; extra flag names per field
    # (e.g. {"pruning_ratio": ("--ratio",)}) and fields to leave out of the command
    cli_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cli_skip: frozenset[str] = frozenset()
    help: str = ""


@dataclass(frozen=True)
class TargetSpec:
    """One export target. ``options`` is the pydantic model of its ``export:`` entry (with
    ``target: Literal[<name>]``); ``exporter`` makes the exporter that writes its artifacts and
    ``runtime_impl`` the runtime, named ``runtime``, that runs them (targets may share one)."""

    name: str
    options: type
    exporter: Callable[[], Any]
    runtime: str
    runtime_impl: Callable[[], Any]
    extra: Optional[str] = None  # the pip extra that installs what it needs ("edgeprep[<extra>]")
    components: tuple[Any, ...] = ()  # edgeprep.doctor.Component rows: the packages it needs, each probed
    # report sections for its artifacts: the report's artifact list in, sections out (none when absent)
    sections: Optional[Callable[[list], Sequence[Any]]] = None
    cli_flags: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # extra flag names per option
    help: str = ""


_STAGES: dict[str, StageSpec] = {}
_TARGETS: dict[str, TargetSpec] = {}
_loaded = False


def register_stage(spec: StageSpec) -> StageSpec:
    if spec.kind in _STAGES and _STAGES[spec.kind] is not spec:
        raise BadInputError(f"stage kind {spec.kind!r} is already registered; a plugin must pick a new kind")
    _STAGES[spec.kind] = spec
    return spec


def register_target(spec: TargetSpec) -> TargetSpec:
    if spec.name in _TARGETS and _TARGETS[spec.name] is not spec:
        raise BadInputError(f"export target {spec.name!r} is already registered; a plugin must pick a new name")
    _TARGETS[spec.name] = spec
    return spec


def _ensure_loaded() -> None:
    """Import the built-in registrations, then the plugins, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("edgeprep.builtin")
    for name in plugin_modules():
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise BadInputError(f"plugin {name!r} (from {PLUGINS_ENV} or the {PLUGIN_ENTRY_POINTS} entry points) "
                                f"cannot be imported ({exc}); install it or fix the name") from None
        except BadInputError as exc:  # e.g. it registers a kind or target that already exists
            raise BadInputError(f"plugin {name!r}: {exc}") from None


def plugin_modules() -> list[str]:
    from importlib.metadata import entry_points

    names = [n.strip() for n in os.environ.get(PLUGINS_ENV, "").split(",") if n.strip()]
    names += [ep.value.split(":")[0] for ep in entry_points(group=PLUGIN_ENTRY_POINTS)]
    return list(dict.fromkeys(names))


def stage_specs() -> dict[str, StageSpec]:
    _ensure_loaded()
    return dict(_STAGES)


def target_specs() -> dict[str, TargetSpec]:
    _ensure_loaded()
    return dict(_TARGETS)


def stage_spec(kind: Any) -> StageSpec:
    specs = stage_specs()
    if kind not in specs:
        raise BadInputError(f"unknown stage kind {kind!r}; valid kinds: {', '.join(specs)}")
    return specs[kind]


def target_spec(name: Any) -> TargetSpec:
    specs = target_specs()
    if name not in specs:
        raise BadInputError(f"unknown export target {name!r}; valid targets: {', '.join(sorted(specs))}")
    return specs[name]


def runtimes() -> dict[str, Callable[[], Any]]:
    """Runtime name -> the callable that makes it, over every registered target."""
    out: dict[str, Callable[[], Any]] = {}
    for spec in target_specs().values():
        out.setdefault(spec.runtime, spec.runtime_impl)
    return out


def replayers() -> dict[str, Replayer]:
    """Decision kind -> replayer, over every registered stage."""
    out: dict[str, Replayer] = {}
    for spec in stage_specs().values():
        out.update(spec.replayers)
    return out


@dataclass(frozen=True)
class Lazy:
    """A callable named ``"module:attr"``, imported on first call: the built-in registry names its
    stages, replayers and report sections this way so that reading the registry (the CLI's
    options, recipe validation) does not import torch."""

    target: str

    def resolve(self) -> Any:
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)


def check_history(kind: str, decisions: Sequence[Mapping[str, Any]]) -> None:
    """The order rules against what a checkpoint's model already went through (its decisions, each
    owned by the stage kind that registered its replayer): a stage kind never runs after a kind it
    conflicts with or one of a higher rank, and only after the kinds it requires."""
    specs = stage_specs()
    spec = stage_spec(kind)
    owner = {decision_kind: s.kind for s in specs.values() for decision_kind in s.replayers}
    earlier = list(dict.fromkeys(owner[d["kind"]] for d in decisions if d.get("kind") in owner))
    clash = [k for k in earlier if k in spec.conflicts]
    if clash:
        raise BadInputError(f"stage {kind}: the model went through an earlier {clash[0]} stage, and {kind} and "
                            f"{clash[0]} are exclusive; start from a checkpoint from before it")
    later = [k for k in earlier if spec.rank is not None and specs[k].rank is not None and specs[k].rank > spec.rank]
    if later:
        raise BadInputError(f"stage {kind}: the model already went through {later[0]}, which must come after "
                            f"{kind}; put {kind} before {later[0]} (start from a checkpoint from before it)")
    missing = [k for k in spec.requires if k not in earlier]
    if missing:
        raise BadInputError(f"stage {kind}: needs an earlier {' and '.join(missing)} stage; run it first")
