"""The command-line layer shared by mqb's tools: checks of the command line before Hydra sees it (a wrong group
choice or key, named with the valid values), user errors told from bugs, the cluster profiles on Hydra's search
path, and :func:`tool_main`, the ``main`` of the Hydra tools ``mqb.sensitivity``, ``mqb.activations`` and
``mqb.deploy`` (their first word and earlier ``--options`` turned into overrides, their options checked, exit 2
for a user error). Imports neither torch nor MONAI nor Lightning, so ``--help``, ``--cfg`` and argument errors
come fast."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from mqb.config import CONF_DIR, EVAL_GROUPS, LAUNCHERS_DIR, EvalConfig
from mqb.tool_config import Tool, node_problems, option_problem


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


def hydra_job() -> Any:
    """Hydra's config (``HydraConfig``) of the job this process runs, or ``None`` outside a Hydra job: also when an
    earlier Hydra app of this process (a notebook, a test) left its config behind without a job's output folder."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    return None if OmegaConf.is_missing(hydra_cfg.runtime, "output_dir") else hydra_cfg


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra ``-m`` sweep."""
    job = hydra_job()
    return job is not None and job.mode == RunMode.MULTIRUN


def with_launchers(argv: list[str]) -> list[str]:
    """``argv`` with mqb's cluster profiles (``launchers/``, ``+cluster=<name>``) on Hydra's search path, and
    Hydra's options (``--cfg job``, ``-m`` ...) moved before the overrides: Hydra's argument parser takes one run
    of overrides, so ``model=unet --cfg job precision=w4a4`` would fail with "unrecognized arguments". The search
    path is left out when the user sets ``hydra.searchpath`` himself. Also makes mqb's Hydra plugins findable
    (:func:`mqb.config.find_mqb_plugins`, called by :func:`mqb.config.register_configs`)."""
    options, overrides = split_hydra_args(argv[1:])
    if not any(a.lstrip("+").startswith("hydra.searchpath") for a in overrides):
        overrides.insert(0, f"hydra.searchpath=[file://{LAUNCHERS_DIR}]")
    return [*argv[:1], *options, *overrides]


def _hydra_flag_takes_value() -> dict[str, str]:
    """Hydra's own options -> "one" (takes the next word), "maybe" (``--info [which]``) or "none"."""
    from hydra._internal.utils import get_args_parser

    arity = {}
    for action in get_args_parser()._actions:
        kind = "one" if action.nargs is None else "maybe" if action.nargs == "?" else "none"
        arity.update(dict.fromkeys(action.option_strings, kind))
    return arity


#: the values ``--info`` takes (its value is optional)
_INFO_CHOICES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def _option_width(args: list[str], i: int, arity: dict[str, str]) -> int:
    """How many words the Hydra option at ``args[i]`` spans (1, or 2 with its value)."""
    flag, has_inline, _ = args[i].partition("=")
    takes = arity.get(flag, "none")
    if has_inline or i + 1 >= len(args) or takes == "none":
        return 1
    return 2 if takes == "one" or args[i + 1] in _INFO_CHOICES else 1


def split_hydra_args(args: list[str]) -> tuple[list[str], list[str]]:
    """``args`` as (Hydra's options with their values, everything else), each in its order."""
    arity = _hydra_flag_takes_value()
    options: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i].startswith("-"):
            width = _option_width(args, i, arity)
            options += args[i : i + width]
            i += width
        else:
            rest.append(args[i])
            i += 1
    return options, rest


def unknown_key(key: str, prog: str = "mqb.eval", schema: type = EvalConfig) -> str | None:
    """Our message for an override of a key the typed schema does not have (``precision.weight.bitz``)."""
    node: Any = schema
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


def check_group_choices(argv: list[str], prog: str = "mqb.eval", schema: type = EvalConfig) -> list[str]:
    """Our messages for a wrong group choice or key (Hydra's follows): which group/key, the valid values.
    ``schema``: the root schema of the tool's config (a tool adds its own node to the eval config)."""
    problems = []
    dirs = config_dirs(argv)
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, _, value = arg.lstrip("+~").partition("=")
        hydra_key = key.split(".")[0] == "hydra"  # Hydra's own settings (launcher, sweeper ...): Hydra checks them
        if "." in key and not arg.startswith("+") and not hydra_key and (message := unknown_key(key, prog, schema)):
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


# -- the Hydra tools: sensitivity, activations, deploy ------------------------------------------------------


class ArgvError(ValueError):
    """A command line a tool cannot take (exit 2); the message names the argument and what is valid."""


def quote(text: str) -> str:
    """``text`` as a quoted Hydra override value (spaces, ``!``, ``*``, ``:`` kept as they are)."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def translate(tool: Tool, args: list[str]) -> list[str]:
    """The tool's command line with its shorthands turned into overrides: the first bare word sets
    ``tool.positional`` (``mqb-deploy profile`` -> ``deploy.command=profile``; ``a,b`` sweeps with ``-m``) and the
    earlier argparse options set their keys (``--groups a b`` -> ``sensitivity.groups=['a','b']``), anywhere on the
    line. Hydra's own options and their values pass through. :class:`ArgvError` for a word it cannot place."""
    hydra_flags = _hydra_flag_takes_value()
    out: list[str] = []
    positional_seen = False
    i = 0
    while i < len(args):
        arg = args[i]
        flag, has_inline, inline = arg.partition("=")
        if arg.startswith("--") and flag in tool.flags:
            key, kind = tool.flags[flag]
            if kind == "false":
                if has_inline:
                    raise ArgvError(f"{tool.prog}: error: {flag} takes no value (it sets {key}=false)")
                out.append(f"{key}=false")
            elif has_inline:
                out.append(f"{key}={quote(inline)}")
            else:
                words = []
                while i + 1 < len(args) and (kind == "list" or not words):
                    nxt = args[i + 1]
                    if kind == "list" and (nxt.startswith("-") or "=" in nxt):
                        break
                    words.append(nxt)
                    i += 1
                if not words:
                    raise ArgvError(f"{tool.prog}: error: {flag} needs a value (it sets {key})")
                out.append(f"{key}=[{','.join(map(quote, words))}]" if kind == "list" else f"{key}={quote(words[0])}")
        elif arg.startswith("-"):
            width = _option_width(args, i, hydra_flags)
            out += args[i : i + width]
            i += width - 1
        elif "=" in arg:
            out.append(arg)
        elif tool.positional and not positional_seen:
            for word in arg.split(","):
                if (problem := option_problem(tool.positional, word)) is not None:
                    raise ArgvError(f"{tool.prog}: error: {problem}")
            out.append(f"{tool.positional}={arg}")
            positional_seen = True
        else:
            example = f"{tool.positional}=..." if tool.positional else f"{tool.node}.<key>=..."
            raise ArgvError(f"{tool.prog}: error: unexpected argument {arg!r}: options are key=value overrides "
                            f"(e.g. {example}); see --help")  # fmt: skip
        i += 1
    return out


def option_problems(tool: Tool, args: list[str]) -> list[str]:
    """Our messages for overrides of the tool's own node with a wrongly typed or invalid value (every value of a
    ``-m`` sweep), before Hydra composes anything: the key and the valid values."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    typed = OmegaConf.merge(OmegaConf.structured(EvalConfig), OmegaConf.structured(tool.schema))  # with defaults
    problems = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg or arg.lstrip("+~").split(".")[0] != tool.node:
            continue
        try:
            override = parser.parse_override(arg)
        except Exception:  # noqa: BLE001  (not an override we can read: Hydra says why)
            continue
        if override.is_delete():
            continue
        key = override.key_or_group
        values = list(override.sweep_iterator()) if override.is_sweep_override() else [override.value()]
        for value in values:
            try:
                OmegaConf.update(typed, key, value, merge=True)
            except Exception as err:  # noqa: BLE001  (a wrong type; an unknown key is check_group_choices')
                if key.count(".") and unknown_key(key, tool.prog, tool.schema) is None:
                    first = str(err).splitlines()[0]
                    problems.append(f"{tool.prog}: error: {key}={value!r}: {first}")
                continue
            if (problem := option_problem(key, OmegaConf.select(typed, key))) is not None:  # as typed: "3" -> 3
                problems.append(f"{tool.prog}: error: {problem}")
    return problems


def tool_config(cfg: DictConfig, tool: Tool) -> tuple[DictConfig, DictConfig]:
    """The eval config (the tool's node left out, so the evaluations a tool runs have the ids ``mqb.eval`` gives
    them) and the tool's options, checked: ``ValueError`` naming the key and the valid values."""
    problems = node_problems(cfg, tool.node)
    if problems:
        raise ValueError("; ".join(problems))
    options = cfg[tool.node]
    if tool.node_in_eval:  # deploy.*: an eval group, not part of a config id; the command stays in the record
        return cfg, options
    eval_cfg = cfg.copy()
    with open_dict(eval_cfg):
        eval_cfg.pop(tool.node)
    return eval_cfg, options


class JobFailed(RuntimeError):
    """A job of a tool's ``-m`` sweep stopped on bad input (Hydra names the job; the sweep goes on)."""


def run_tool_task(tool: Tool, work: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run a tool's task: a user error ends a single run with exit 2 and one line naming it; in a ``-m`` sweep it
    fails this job with that line (Hydra runs the others and exits non-zero at the end); a bug raises."""
    try:
        work()
    except Exception as err:  # noqa: BLE001
        problem = user_error(err) or (err if isinstance(err, user_errors) else None)
        if problem is None:
            raise
        if is_multirun():
            raise JobFailed(f"{tool.prog}: error: {problem}") from None
        print(f"{tool.prog}: error: {problem}", file=sys.stderr)
        sys.exit(2)


def _completion_line(tool: Tool, args: list[str]) -> None:
    """Shell completion (``-sc query=bash``) reads the line from ``COMP_LINE``: translate the tool's shorthands
    there too, and offer the first word's choices (``mqb-deploy <TAB>``: export, profile, compare)."""
    line = os.environ.get("COMP_LINE")
    if "query=bash" not in args or not line:
        return
    words = line.split()
    rest, current = (words[1:], "") if line.endswith(" ") else (words[1:-1], words[-1] if len(words) > 1 else "")
    if tool.positional and not [w for w in rest if not w.startswith("-")] and "=" not in current:
        print(" ".join(c for c in tool.positional_choices if c.startswith(current)), end=" ")
    try:
        translated = translate(tool, rest)
    except ArgvError:
        return
    os.environ["COMP_LINE"] = " ".join([words[0], *translated, *([current] if current else [])]) + (
        " " if line.endswith(" ") else ""
    )


def tool_main(tool: Tool, hydra_main: Callable[[], Any], argv: list[str] | None = None) -> int:
    """The ``main`` of a Hydra tool: translate the shorthands, refuse a wrong group choice, key or option value
    (exit 2, naming it and the valid values), then run Hydra (``--help``, ``--cfg``, ``-m``, ``-sc`` ...) on the
    tool's primary config. ``argv``: the arguments (default ``sys.argv[1:]``); returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    _completion_line(tool, args)
    try:
        args = translate(tool, args)
    except ArgvError as err:
        print(err, file=sys.stderr)
        return 2
    problems = check_group_choices(args, prog=f"{tool.prog}: error", schema=tool.schema)
    problems += option_problems(tool, args)
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = with_launchers([saved[0] if saved else tool.prog, *args])
    try:
        hydra_main()
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = saved
    return 0
