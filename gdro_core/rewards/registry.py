"""Rewards found by name: built-in, registered by a package under the ``gdro.rewards`` entry point, or a local
class as ``module:Class`` (or ``path/to/file.py:Class``, read relative to the project root).

A third-party package registers its rewards in its ``pyproject.toml``::

    [project.entry-points."gdro.rewards"]
    my_reward = "my_package.rewards:MyReward"

Nothing here imports a reward until it is made, so naming rewards costs no model load, and
:func:`reward_sources` can key the stages that score on the code of exactly the configured rewards.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from gdro_core.build_lock import building
from gdro_core.rewards.base import Reward, RewardError

if TYPE_CHECKING:
    from gdro_core.params import Params

ENTRY_POINT_GROUP = "gdro.rewards"
BUILTIN: dict[str, str] = {
    "ocr": "gdro_core.tasks.ocr.reward:OcrReward",
    "geneval": "gdro_core.tasks.geneval.reward:GenEvalReward",
    "clip_score": "gdro_core.rewards.clip_score:ClipScoreReward",
    "pickscore": "gdro_core.rewards.pickscore:PickScoreReward",
    "aesthetic": "gdro_core.rewards.aesthetic:AestheticReward",
    "vlm": "gdro_core.rewards.vlm:VlmReward",
    "remote": "gdro_core.rewards.remote:RemoteReward",
}
"""Name -> ``module:Class`` of the rewards that come with gdro."""


def registered() -> dict[str, str]:
    """Name -> ``module:Class`` of the rewards installed packages register (the ``gdro.rewards`` entry point)."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def reward_names() -> dict[str, str]:
    """Every reward ``rewards.weights`` can name without a ``module:Class``: built-in first."""
    return {**registered(), **BUILTIN}


def _is_spec(name: str) -> bool:
    return ":" in name


def resolve(name: str) -> str:
    """``module:Class`` for a reward name (a ``module:Class`` stays as it is)."""
    if _is_spec(name):
        return name
    known = reward_names()
    if name not in known:
        raise RewardError(
            f"unknown reward {name!r} in rewards.weights; the rewards are {', '.join(map(repr, sorted(known)))}, "
            "or name a class of yours as 'module:Class' (or 'path/to/file.py:Class')"
        )
    return known[name]


def _module_file(module: str, root: Path) -> Path | None:
    """The file a ``module:Class`` module part names: a ``.py`` path (relative to ``root``), else where import
    would find it (``root`` first, as a project-local module)."""
    if module.endswith(".py"):
        path = Path(module) if Path(module).is_absolute() else root / module
        return path.resolve() if path.is_file() else None
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec and spec.origin and spec.origin.endswith(".py") else None


def reward_class(name: str, root: Path = Path(".")) -> type:
    """The class a reward name stands for, imported now; a name that cannot be imported says why in one line."""
    spec = resolve(name)
    module, _, cls = spec.rpartition(":")
    try:
        if module.endswith(".py"):
            path = _module_file(module, Path(root).resolve())
            if path is None:
                raise RewardError(f"reward {name!r}: no file {module} (relative to the project root {root})")
            loader = importlib.util.spec_from_file_location(f"gdro_user_reward_{path.stem}", path)
            mod = importlib.util.module_from_spec(loader)
            sys.modules[loader.name] = mod
            loader.loader.exec_module(mod)
        else:
            _module_file(module, Path(root).resolve())  # puts the project root on sys.path for a local module
            mod = importlib.import_module(module)
    except RewardError:
        raise
    except Exception as err:  # noqa: BLE001 - any import failure is reported as the reward's, in one line
        raise RewardError(f"reward {name!r}: cannot import {module} ({type(err).__name__}: {err})") from None
    try:
        return getattr(mod, cls)
    except AttributeError:
        raise RewardError(f"reward {name!r}: {module} has no class {cls!r}") from None


def reward_options(name: str, cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The options of reward ``name``, validated by the class's ``Options`` model where it has one."""
    model = getattr(cls, "Options", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return dict(options)
    try:
        return model.model_validate(options).model_dump()
    except ValidationError as err:
        lines = [f"invalid options for reward {name!r}:"]
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            lines.append(f"  'rewards.options.{name}.{key}': {e['msg'].removeprefix('Value error, ')}")
        raise RewardError("\n".join(lines)) from None


def make_reward(name: str, params: Params, root: Path = Path(".")) -> Reward:
    """Reward ``name`` with its options from ``rewards.options``; checked against the protocol."""
    cls = reward_class(name, root)
    options = reward_options(name, cls, params.rewards.options.get(name, {}))
    try:
        with building():  # a reward that loads a model in its constructor builds it alone (see build_lock)
            reward = cls.from_params(params, options) if hasattr(cls, "from_params") else cls(**options)
    except RewardError:
        raise
    except TypeError as err:
        raise RewardError(f"reward {name!r}: {cls.__name__} does not take these options ({err}); set "
                          f"rewards.options['{name}'] to what its __init__ takes") from None
    if not callable(getattr(reward, "score", None)):
        raise RewardError(f"reward {name!r}: {cls.__name__} has no score(images, records) method; see "
                          "gdro_core/rewards/base.py for the protocol")
    if getattr(reward, "needs_world", False) and params.model.source != "builtin":
        raise RewardError(f"reward {name!r} scores only the built-in world's images, but model.source is "
                          f"{params.model.source!r}: drop it from rewards.weights")
    return reward


def task_reward(params: Params, own: Callable[[], Reward], root: Path = Path(".")) -> Reward:
    """What scores the task's images: its own reward (``own()``, built only when used) when ``rewards.weights`` is
    empty, else the weighted sum of the named rewards, the task's own among them under the task's name."""
    from gdro_core.rewards.weighted import WeightedReward

    weights = params.rewards.weights
    if not weights:
        return own()
    parts = [(n, w, own() if n == params.task else make_reward(n, params, root)) for n, w in weights.items()]
    return WeightedReward(parts, primary=params.task)


def configured(params: Params) -> dict[str, float]:
    """The rewards that score images and their weights: ``rewards.weights``, or the task's own reward alone."""
    return dict(params.rewards.weights) or {params.task: 1.0}


OWN_PACKAGES = ("gdro_core", "flows")
"""gdro's own packages: a reward's imports of them are hashed with the stage's own code, not as the reward's."""


def _local_module(name: str, root: Path) -> Path | None:
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def local_imports(path: Path, root: Path) -> list[Path]:
    """The project's files that a reward file imports, directly or through each other (imports inside functions
    count), found where the reward's ``import`` finds them: under ``root``, or beside the importing file for a relative
    import. An edit to such a helper changes the rewards as much as one to the reward file itself. gdro's own
    packages and installed ones are left out."""
    root = Path(root).resolve()
    todo, seen = [Path(path).resolve()], set()
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue  # importing it fails with its own message; what it would import is unknown
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    package = f.parents[node.level - 1] if node.level <= len(f.parents) else None
                    if package is None or not package.is_relative_to(root):
                        continue
                    base = ".".join([*package.relative_to(root).parts, *filter(None, [node.module])])
                else:
                    base = node.module or ""
                names = [base, *(f"{base}.{a.name}" if base else a.name for a in node.names)]
            else:
                continue
            parents = {".".join(n.split(".")[:i]) for n in filter(None, names) for i in range(1, n.count(".") + 1)}
            for name in sorted(parents | set(filter(None, names))):  # a package's __init__ runs on the way
                if name.split(".")[0] in OWN_PACKAGES:
                    continue
                target = _local_module(name, root)
                if target is not None and ".venv" not in target.relative_to(root).parts:
                    todo.append(target)
    return sorted(seen - {Path(path).resolve()})


def reward_sources(params: Params, root: Path = Path(".")) -> tuple[list[str], list[dict[str, str]]]:
    """What the configured rewards run, for the code key of the stages that score: the project modules (their
    import closure is added by :mod:`gdro_core.code_closure`) and, for rewards outside the project, each one's
    file hash (``module:Class``) or its distribution and version (an entry point)."""
    modules: list[str] = []
    external: list[dict[str, str]] = []
    eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in sorted(configured(params)):
        spec = resolve(name)
        module = spec.rpartition(":")[0]
        if module.startswith(("gdro_core.", "flows.")):
            modules.append(module)
        elif not _is_spec(name) and name in eps and name not in BUILTIN:
            dist = eps[name].dist
            external.append({"reward": name, "entry_point": spec,
                             "version": f"{dist.name}=={dist.version}" if dist else "unknown"})
        else:
            root_dir = Path(root).resolve()
            path = _module_file(module, root_dir)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path else "missing"
            record: dict[str, Any] = {"reward": name, "module": module, "sha256": digest}
            helpers = local_imports(path, root_dir) if path and path.is_relative_to(root_dir) else []
            if helpers:
                record["imports"] = {h.relative_to(root_dir).as_posix(): hashlib.sha256(h.read_bytes()).hexdigest()
                                     for h in helpers}
            external.append(record)
    return modules, external


def local_reward_files(params: Params, root: Path) -> list[str]:
    """The project's own reward files that ``rewards.weights`` names (``module:Class`` or ``file.py:Class`` under
    ``root``) and the project files they import (:func:`local_imports`), relative to it: what the ``check`` stage of
    dvc.yaml must depend on for an edit to rerun ``score``."""
    root = Path(root).resolve()
    out: list[str] = []
    for name in sorted(params.rewards.weights):
        if not _is_spec(name):
            continue
        path = _module_file(name.rpartition(":")[0], root)
        if path is not None and path.is_relative_to(root) and ".venv" not in path.relative_to(root).parts:
            for f in (path, *local_imports(path, root)):
                if f.relative_to(root).as_posix() not in out:
                    out.append(f.relative_to(root).as_posix())
    return out
