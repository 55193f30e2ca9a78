"""Model sources: zoo name, ``"package.module:factory"``, TorchScript, torch.export ``.pt2``,
``.safetensors`` + factory, and ``.pt`` / ``.pth`` files.

``.pt`` files are read with ``torch.load(weights_only=True)``: tensors and plain containers only.
Anything else in a pickle can run arbitrary code while it is read, so it is refused with
``UnsafePickleError`` unless the user explicitly trusts the file (``--trust-pickle``).
Every failure is a one-line ``BadInputError`` saying what, where, and how to fix it.
"""
from __future__ import annotations

import importlib
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from edgeprep.errors import BadInputError, UnsafePickleError
from edgeprep.models.zoo import ZOO, ModelHandle, build_zoo_model
from edgeprep.recipe import ModelConfig

TORCHSCRIPT_SUFFIXES = (".ts", ".torchscript")
EXPORT_SUFFIXES = (".pt2",)
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth")  # a .pt may also be a TorchScript archive: detected by content
MODEL_FILE_SUFFIXES = TORCHSCRIPT_SUFFIXES + EXPORT_SUFFIXES + SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# "package.module:attr" with an optional dotted attribute path after the colon ("mod:Class.build").
FACTORY_RE = re.compile(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
_FACTORY_SEED = 0  # factories are built under a fixed seed too, so a recipe always gives one init


# ----------------------------------------------------------------------------- source resolution
def source_path(source: str, base_dir: Path | None) -> Path | None:
    """The file ``source`` names (absolute), or None for a zoo name or a factory string."""
    if source in ZOO or source in _hf_builtins():
        return None
    path = Path(source).expanduser()
    if not path.is_absolute():
        path = (Path(base_dir) if base_dir is not None else Path.cwd()) / path
    if path.suffix.lower() in MODEL_FILE_SUFFIXES or path.exists() or not FACTORY_RE.fullmatch(source):
        return path
    return None


def absolute_model_config(cfg: ModelConfig, base_dir: Path | None) -> ModelConfig:
    """``cfg`` with a relative file source made absolute, so it loads from any working directory."""
    path = source_path(cfg.source, base_dir)
    if path is None or str(path) == cfg.source:
        return cfg
    return cfg.model_copy(update={"source": str(path)})


def _hf_builtins() -> tuple[str, ...]:
    from edgeprep.models.hf import BUILTIN_DIRS  # no transformers import: just the names

    return tuple(BUILTIN_DIRS)


def _load_hf(cfg: ModelConfig, path: Path | None) -> ModelHandle:
    """A Hugging Face model directory (or a built-in one): an image classifier (ViT, DeiT, ...) as a
    classifier, anything else as a packed sentence-embedding model."""
    from edgeprep.models.hf import (
        BUILTIN_DIRS,
        DEFAULT_TEXT_DATA,
        PackedTokens,
        is_image_classifier,
        load_image_classifier,
        load_sentence_encoder,
        read_config,
    )

    for key in ("factory", "input_shape"):
        if getattr(cfg, key) is not None:
            raise BadInputError(f"model.{key} does not apply to a Hugging Face model ({cfg.source}); remove it")
    if cfg.kwargs:
        raise BadInputError(f"model.kwargs {sorted(cfg.kwargs)} do not apply to a Hugging Face model "
                            f"({cfg.source}); remove them")
    directory = BUILTIN_DIRS[cfg.source]() if path is None else path
    if is_image_classifier(read_config(directory)):
        module, shape, num_classes = load_image_classifier(directory)
        return ModelHandle(module=module, name=directory.name, input_shape=shape, num_classes=num_classes,
                           data=None)
    encoder, tokenizer = load_sentence_encoder(directory)
    name = cfg.source if path is None else path.name
    return ModelHandle(module=PackedTokens(encoder).eval(), name=name, input_shape=None, num_classes=None,
                       data=DEFAULT_TEXT_DATA, tokenizer=tokenizer)


def load_source(cfg: ModelConfig, base_dir: Path | None = None, trust_pickle: bool = False) -> ModelHandle:
    if cfg.source in _hf_builtins():
        return _load_hf(cfg, None)
    if cfg.source in ZOO:
        if cfg.factory is not None:
            raise BadInputError(f"model.factory is only used with a .safetensors or .pt weights file, not with "
                                f"zoo model {cfg.source!r}; remove it")
        handle = build_zoo_model(cfg.source, cfg.kwargs)
        _check_input_shape(handle, cfg)
        return handle
    path = source_path(cfg.source, base_dir)
    if path is None:
        if cfg.factory is not None:
            raise BadInputError(f"model.factory is only used with a weights file; model.source {cfg.source!r} "
                                "already builds the model, remove model.factory")
        module = _build_factory(cfg.source, cfg.kwargs, base_dir, "model.source")
        return _handle(module, cfg.source, cfg)
    if path.is_dir() and (path / "config.json").is_file():  # a transformers model directory
        return _load_hf(cfg, path)
    if not path.is_file():
        what = "file not found" if not path.exists() else "not a file"
        raise BadInputError(f"model source {cfg.source!r}: {what} at {path}; give a zoo model "
                            f"({', '.join(sorted(ZOO))}), 'package.module:factory', or a model file "
                            f"({', '.join(MODEL_FILE_SUFFIXES)})")
    suffix = path.suffix.lower()
    if cfg.factory is not None and suffix not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise BadInputError(f"model.factory is only used with a .safetensors or .pt weights file, not with "
                            f"{path.name}; remove it")
    if suffix in TORCHSCRIPT_SUFFIXES or (suffix in PICKLE_SUFFIXES and _is_torchscript_archive(path)):
        return _handle(_load_torchscript(path), path.name, cfg)
    if suffix in EXPORT_SUFFIXES:
        module, shape = _load_exported(path)
        return _handle(module, path.name, cfg, inferred_shape=shape)
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors_with_factory(path, cfg, base_dir)
    if suffix in PICKLE_SUFFIXES:
        return _load_pickle(path, cfg, base_dir, trust_pickle)
    raise BadInputError(f"{path}: unsupported model file type {suffix or '(no suffix)'!r}; "
                        f"use one of {', '.join(MODEL_FILE_SUFFIXES)}")


def _handle(module: nn.Module, name: str, cfg: ModelConfig, inferred_shape: tuple[int, ...] | None = None,
            num_classes: int | None = None, data: str | None = None) -> ModelHandle:
    shape = tuple(cfg.input_shape) if cfg.input_shape is not None else inferred_shape
    set_eval(module)
    return ModelHandle(module=module, name=name, input_shape=shape, num_classes=num_classes, data=data)


def set_eval(module: nn.Module) -> None:
    """module.eval(), tolerating modules that cannot switch modes (torch.export programs)."""
    try:
        module.eval()
    except NotImplementedError:  # some torch.export modules refuse train/eval switching
        pass


def _check_input_shape(handle: ModelHandle, cfg: ModelConfig) -> None:
    if cfg.input_shape is not None and tuple(cfg.input_shape) != handle.input_shape:
        raise BadInputError(f"model.input_shape {list(cfg.input_shape)} does not match {handle.name}'s "
                            f"{list(handle.input_shape or ())}; remove model.input_shape (the zoo knows it) "
                            "or change model.kwargs")


# ----------------------------------------------------------------------------- factories
def resolve_factory(spec: str, base_dir: Path | None, what: str) -> Callable[..., Any]:
    """Import the callable named by ``"package.module:attr"``.

    A module that is not importable but sits next to the recipe (``base_dir``) is imported from
    there; ``base_dir`` then stays on ``sys.path`` because the module's own imports may need it.
    """
    match = FACTORY_RE.fullmatch(spec)
    if match is None:
        raise BadInputError(f"{what} {spec!r} is not 'package.module:factory' (e.g. 'mypkg.models:build'); "
                            f"zoo models are: {', '.join(sorted(ZOO))}")
    module_name, attr_path = match.groups()
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        top = module_name.split(".")[0]
        local = base_dir is not None and ((Path(base_dir) / f"{top}.py").is_file() or (Path(base_dir) / top).is_dir())
        if exc.name != top or not local:
            raise BadInputError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}); install it or put it "
                                "on PYTHONPATH") from None
        sys.path.insert(0, str(Path(base_dir).resolve()))
        return resolve_factory(spec, None, what)
    except Exception as exc:  # the user's module raised while importing
        raise BadInputError(f"{what} {spec!r}: importing {module_name!r} failed with "
                            f"{type(exc).__name__}: {exc}") from None
    obj: Any = mod
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise BadInputError(f"{what} {spec!r}: {module_name!r} has no attribute {attr_path!r}; "
                                "check the name after the colon")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInputError(f"{what} {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a callable factory")
    return obj


def _build_factory(spec: str, kwargs: Mapping[str, Any], base_dir: Path | None, what: str) -> nn.Module:
    fn = resolve_factory(spec, base_dir, what)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_FACTORY_SEED)
        try:
            module = fn(**kwargs)
        except Exception as exc:  # any failure in user code is the user's input problem
            raise BadInputError(f"{what} {spec!r}: calling it with model.kwargs {dict(kwargs)} raised "
                                f"{type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise BadInputError(f"{what} {spec!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _build_for_weights(cfg: ModelConfig, path: Path, base_dir: Path | None) -> ModelHandle:
    """The module that a weights-only file (state dict) is loaded into: zoo name or factory."""
    if cfg.factory is None:
        raise BadInputError(f"{path}: holds weights only (a state dict); set model.factory to a zoo model "
                            f"({', '.join(sorted(ZOO))}) or 'package.module:factory' that builds the model")
    if cfg.factory in ZOO:
        handle = build_zoo_model(cfg.factory, cfg.kwargs)
        _check_input_shape(handle, cfg)
        handle.name = path.name
        return handle
    return _handle(_build_factory(cfg.factory, cfg.kwargs, base_dir, "model.factory"), path.name, cfg)


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with one readable line on mismatch (names and shapes)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label}: {_first(items)}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if items]
        raise BadInputError(f"{where}: weights do not fit the model ({'; '.join(parts)}); check model.factory "
                            "and model.kwargs build the model these weights came from")
    module.load_state_dict(dict(state), strict=True)


def _first(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


# ----------------------------------------------------------------------------- file formats
def _is_torchscript_archive(path: Path) -> bool:
    # TorchScript zips hold "<archive>/code/..." and "<archive>/constants.pkl"; torch.save zips do not.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in n or n.endswith("/constants.pkl") for n in zf.namelist())


def _load_torchscript(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch >= 2.9 marks torch.jit as deprecated; it still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError / ValueError with long C++ traces
        raise BadInputError(f"{path}: cannot load as TorchScript ({type(exc).__name__}: "
                            f"{_short(exc)}); save it with torch.jit.save") from None


class ExportedProgramModule(nn.Module):
    """A torch.export program as an ordinary nn.Module.

    ``ExportedProgram.module()`` refuses ``.train()`` / ``.eval()`` (its graph is specialised to the
    mode it was exported in), which every stage, metric and exporter calls. Mode switches stop at
    this wrapper: the graph keeps its exported behaviour, and its weights stay trainable.
    """

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.program = graph_module

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> "ExportedProgramModule":
        self.training = mode
        return self


def _require_dynamic_batch(program: Any, path: Path) -> None:
    """Training, evaluation and export all run other batch sizes than the one a program was traced
    with; a program specialised to one batch fails deep inside with a guard error, so say it here."""
    for node in program.graph_module.graph.nodes:
        if node.op != "placeholder" or node.name not in _user_input_names(program):
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() > 0 and isinstance(val.shape[0], int):
            raise BadInputError(
                f"{path}: input {node.name!r} has a fixed batch of {val.shape[0]}; re-export it with a dynamic "
                "batch dim: torch.export.export(model, args, dynamic_shapes=({0: torch.export.Dim('batch')},))")


def _user_input_names(program: Any) -> set[str]:
    from torch.export.graph_signature import InputKind

    return {s.arg.name for s in program.graph_signature.input_specs if s.kind == InputKind.USER_INPUT}


def _load_exported(path: Path) -> tuple[nn.Module, tuple[int, ...] | None]:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise BadInputError(f"{path}: cannot load as a torch.export program ({type(exc).__name__}: "
                            f"{_short(exc)}); save it with torch.export.save") from None
    _require_dynamic_batch(program, path)
    shape = None
    example = getattr(program, "example_inputs", None)  # ((args...), {kwargs}) when recorded
    if example and len(example[0]) == 1 and isinstance(example[0][0], torch.Tensor):
        shape = tuple(int(d) for d in example[0][0].shape[1:])
    return ExportedProgramModule(program.module()), shape


def _load_safetensors_with_factory(path: Path, cfg: ModelConfig, base_dir: Path | None) -> ModelHandle:
    state = read_safetensors(path)
    handle = _build_for_weights(cfg, path, base_dir)
    load_state_dict_strict(handle.module, state, str(path))
    set_eval(handle.module)
    return handle


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, restoring tied names that ``safetensors.torch.save_model``
    dropped (recorded in the metadata as ``removed name -> kept name``)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadInputError(f"{path}: not a readable safetensors file ({exc}); "
                            "write it with safetensors.torch.save_file") from None
    for removed, kept in metadata.items():
        if removed not in state and kept in state:
            state[removed] = state[kept]
    return state


def _load_pickle(path: Path, cfg: ModelConfig, base_dir: Path | None, trust_pickle: bool) -> ModelHandle:
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, nn.Module):
        return _handle(obj, path.name, cfg)
    state = _as_state_dict(obj)
    if state is None:
        raise BadInputError(f"{path}: holds a {type(obj).__name__}, neither a state dict of tensors nor an "
                            "nn.Module; save model.state_dict() instead")
    handle = _build_for_weights(cfg, path, base_dir)
    load_state_dict_strict(handle.module, state, str(path))
    set_eval(handle.module)
    return handle


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it reads anyway
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports corrupted files and refused pickles alike; parsing the opcodes (which never
        # executes them) tells a foreign/corrupted file from a pickle that would import code.
        imports = _pickle_imports(path)
        if imports is None:
            raise BadInputError(f"{path}: not a pickle or torch.save file (corrupted or another format); "
                                "re-save it with torch.save(model.state_dict(), path)") from None
        if not trust_pickle:
            raise UnsafePickleError(
                f"{path}: refused to load: unpickling it needs arbitrary code execution ("
                f"{_refusal_reason(exc, imports)}, which torch.load(weights_only=True) does not allow); pass "
                "--trust-pickle (or set model.trust_pickle: true) only if you trust the file's author, or "
                "re-save the model as a state dict / safetensors") from None
    except Exception as exc:
        raise BadInputError(f"{path}: cannot read with torch.load ({type(exc).__name__}: {_short(exc)}); "
                            "is it a file written by torch.save?") from None
    # Trusted by the user: a full pickle (e.g. torch.save(model)). This runs code from the file.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise BadInputError(f"{path}: trusted pickle failed to load ({type(exc).__name__}: {_short(exc)}); "
                            "the classes it references must be importable here") from None


def _refusal_reason(exc: Exception, imports: list[str]) -> str:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
    if found:  # torch names the first import it refused
        return f"it imports {found.group(1)}"
    if imports:
        return f"it imports {_first(imports)}"
    return "it uses pickle opcodes outside the tensor-only subset"


def _pickle_imports(path: Path, max_pickles: int = 8) -> list[str] | None:
    """The names a pickle file would import, read with ``pickletools`` (parses, never executes).

    Looks at ``data.pkl`` of a torch.save zip, else at the (possibly several, for torch's legacy
    format) pickles at the start of the file. None when not even the first pickle parses.
    """
    import io
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                member = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
                if member is None:
                    return None
                data = zf.read(member)
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    stream, imports, strings, parsed = io.BytesIO(data), [], [], 0
    while parsed < max_pickles and stream.tell() < len(data):
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    imports.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    imports.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # pickletools raises ValueError and friends on bytes that are not opcodes
            break
        parsed += 1
    return list(dict.fromkeys(imports)) if parsed else None


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """A state dict, or one nested under a usual key ({"state_dict": ...}, {"model": ...})."""
    def is_state(d: Any) -> bool:
        return isinstance(d, Mapping) and bool(d) and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())

    if is_state(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state(obj.get(key)):
                return dict(obj[key])
    return None


def _short(exc: BaseException, limit_chars: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit_chars else text[:limit_chars] + "..."
