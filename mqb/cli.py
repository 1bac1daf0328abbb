"""The command-line layer shared by mqb's tools: checks of the command line before Hydra sees it (a wrong group
choice or key, named with the valid values), user errors told from bugs, the cluster profiles on Hydra's search
path. Imports neither torch nor MONAI nor Lightning, so ``--help``, ``--cfg`` and argument errors come fast."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from mqb.config import CONF_DIR, EVAL_GROUPS, LAUNCHERS_DIR, EvalConfig


def user_error(err: BaseException) -> BaseException | None:
    """The bad-input error behind ``err`` (also when wrapped by MONAI/Lightning), or ``None`` for a bug."""
    from mqb.checkpoints import CheckpointError
    from mqb.data.sources import DatasetError
    from mqb.results import ResultsDirError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (CheckpointError, DatasetError, ValueError, FileNotFoundError, ResultsDirError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra ``-m`` sweep."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def with_launchers(argv: list[str]) -> list[str]:
    """``argv`` with mqb's cluster profiles (``launchers/``, ``+cluster=<name>``) on Hydra's search path, placed
    beside the other overrides so Hydra's argument parser keeps them together; unchanged when the user sets
    ``hydra.searchpath`` himself."""
    if any(a.startswith("hydra.searchpath") for a in argv[1:]):
        return argv
    overrides = [i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")]
    out = list(argv)
    out.insert(overrides[0] if overrides else len(out), f"hydra.searchpath=[file://{LAUNCHERS_DIR}]")
    return out


def unknown_key(key: str, prog: str = "mqb.eval") -> str | None:
    """Our message for an override of a key the typed schema does not have (``precision.weight.bitz``)."""
    node: Any = EvalConfig
    path = []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # free-form (model, dataset, logger): Hydra checks those against the YAML
        fields = {f.name: f for f in dataclasses.fields(node)}
        if part not in fields:
            where = ".".join(path) or "the top level"
            valid = ", ".join(sorted(n for n in fields if not n.startswith("_")))
            return f"{prog}: unknown key {key!r}: {where} has no {part!r}; valid keys there: {valid}"
        path.append(part)
        hints = typing.get_type_hints(node)
        node = next((a for a in typing.get_args(hints[part]) if dataclasses.is_dataclass(a)), hints[part])
    return None


def config_dirs(argv: list[str]) -> list[Path] | None:
    """mqb's config folder plus the user's: ``--config-dir DIR`` / ``-cd DIR`` / ``--config-dir=DIR`` and
    ``hydra.searchpath=[file://DIR, ...]``; ``None`` when a search path is not a folder (``pkg://``)."""
    dirs = [CONF_DIR]
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]).expanduser())
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.partition("=")[2]).expanduser())
        elif arg.lstrip("+").startswith("hydra.searchpath="):
            for entry in arg.partition("=")[2].strip("[]").split(","):
                entry = entry.strip().strip("'\"")
                if entry.startswith("pkg://"):
                    return None
                if entry:
                    dirs.append(Path(entry.removeprefix("file://")).expanduser())
    return dirs


def check_group_choices(argv: list[str], prog: str = "mqb.eval") -> list[str]:
    """Our messages for a wrong group choice or key (Hydra's follows): which group/key, the valid values."""
    problems = []
    dirs = config_dirs(argv)
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        hydra_key = key.split(".")[0] == "hydra"  # Hydra's own settings (launcher, sweeper ...): Hydra checks them
        if "." in key and not arg.startswith("+") and not hydra_key and (message := unknown_key(key, prog)):
            problems.append(message)
            continue
        if key not in EVAL_GROUPS or not value or value.startswith(("choice(", "range(", "glob(")):
            continue
        if dirs is None:  # a pkg:// search path: its choices cannot be listed here; Hydra checks them
            continue
        valid = sorted({p.stem for d in dirs for p in (d / key).glob("*.yaml")})
        for choice in value.split(","):
            if choice and choice != "null" and choice not in valid:
                problems.append(
                    f"{prog}: unknown {key} {choice!r} in '{arg}'; valid {key} choices: {', '.join(valid)}"
                )
    return problems


