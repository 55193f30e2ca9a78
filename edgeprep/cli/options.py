"""Command-line options generated from a pydantic config model, so each option is declared once:
in the stage's (or target's) config. A field ``warmup_steps`` becomes ``--warmup-steps``; a nested
``train:`` block is flattened (``--lr``, ``--batch-size``); another nested model gets its name as
a prefix (``--loss-weights-scores``); ``distill: Optional[DistillConfig]`` becomes
``--distill/--no-distill``. Every generated option defaults to "not given", so the config's own
default applies and validation (with the recipe's one-line messages) happens in one place.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from edgeprep.recipe_stages import TrainConfig

# nested blocks whose fields are options of their own name (`--lr`, not `--train-lr`), with the
# model that holds their defaults when not given (a stage's `train:` overrides the train defaults)
FLATTENED: dict[str, type[BaseModel]] = {"train": TrainConfig}


@dataclass(frozen=True)
class ConfigOption:
    path: tuple[str, ...]  # where the value goes in the config dict, e.g. ("train", "lr")
    param: str  # the Python parameter name of the generated command
    flags: tuple[str, ...]
    annotation: Any
    required: bool
    help: str
    switch_model: bool = False  # an Optional[Model] given as a flag: True -> {} (its defaults), False -> None


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _describe(info: FieldInfo, base: Any, default_from: Optional[FieldInfo] = None) -> str:
    parts = [info.description] if info.description else []
    if typing.get_origin(base) is Literal:
        parts.append("one of: " + ", ".join(map(str, typing.get_args(base))))
    elif typing.get_origin(base) is list and typing.get_origin(typing.get_args(base)[0]) is Literal:
        parts.append("repeat; each one of: " + ", ".join(map(str, typing.get_args(typing.get_args(base)[0]))))
    if not info.is_required():
        default = (default_from or info).get_default(call_default_factory=True)
        if not isinstance(default, BaseModel):
            parts.append(f"default: {default!r}" if default is not None else "default: none")
    return "; ".join(parts)


def _cli_type(base: Any) -> Any:
    """The Python type Typer parses the option as (pydantic then validates the value)."""
    if typing.get_origin(base) is Literal:
        return type(typing.get_args(base)[0])
    if typing.get_origin(base) is list:
        item = typing.get_args(base)[0]
        return list[_cli_type(item)]
    return base


def config_options(model: type[BaseModel], *, skip: frozenset[str] = frozenset(),
                   extra_flags: Mapping[str, tuple[str, ...]] | None = None,
                   path: tuple[str, ...] = (), name_prefix: tuple[str, ...] = (),
                   defaults: Optional[type[BaseModel]] = None) -> list[ConfigOption]:
    """The options for ``model``'s fields (``kind`` / ``target`` discriminators left out)."""
    extra_flags = extra_flags or {}
    found: list[ConfigOption] = []
    for name, info in model.model_fields.items():
        if name in ("kind", "target") or name in skip:
            continue
        base, optional = _unwrap_optional(info.annotation)
        field_path, names = (*path, name), (*name_prefix, name)
        if _is_model(base) and not optional:
            # a flattened block's fields that the parent also has (a stage's `steps` vs train.steps) stay the parent's
            flat = name in FLATTENED
            found += config_options(base, skip=frozenset(model.model_fields) if flat else frozenset(),
                                    extra_flags=extra_flags, path=field_path, name_prefix=() if flat else names,
                                    defaults=FLATTENED.get(name))
            continue
        param = "_".join(names)
        flag = f"--{param.replace('_', '-')}"
        if _is_model(base):  # Optional[Model]: on with its defaults, or off
            found.append(ConfigOption(field_path, param, (f"{flag}/--no-{flag[2:]}",), Optional[bool], False,
                                      _switch_help(info), switch_model=True))
            continue
        cli_type = _cli_type(base)
        flags = (f"{flag}/--no-{flag[2:]}",) if cli_type is bool else (flag, *extra_flags.get(param, ()))
        default_from = defaults.model_fields.get(name) if defaults is not None else None
        found.append(ConfigOption(field_path, param, flags, Optional[cli_type], info.is_required(),
                                  _describe(info, base, default_from)))
    return found


def _switch_help(info: FieldInfo) -> str:
    default = info.get_default(call_default_factory=True)
    return f"{info.description + '; ' if info.description else ''}default: {'on' if default is not None else 'off'}"


def parameters(options: list[ConfigOption]) -> list[inspect.Parameter]:
    return [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                              default=typer.Option(... if o.required else None, *o.flags, help=o.help))
            for o in options]


def values_to_config(options: list[ConfigOption], values: Mapping[str, Any]) -> dict[str, Any]:
    """The nested config dict of the options that were given (None: not given)."""
    data: dict[str, Any] = {}
    for o in options:
        value = values.get(o.param)
        if value is None or (isinstance(value, list) and not value):
            continue
        if o.switch_model:
            value = {} if value else None
        node = data
        for key in o.path[:-1]:
            node = node.setdefault(key, {})
        node[o.path[-1]] = value
    return data
