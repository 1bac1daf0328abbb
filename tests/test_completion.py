"""Hydra's bash completion of mqb's console scripts really completes: ``eval "$(mqb-eval -sc install=bash)"`` and then
TAB after ``mqb-eval model=`` offers the model zoo (``conf/model/*.yaml``); the same for ``mqb-sensitivity`` and
``mqb-deploy`` (whose first word, ``export|profile|compare``, completes too).

The console scripts are made here as pip makes them from ``pyproject.toml`` ``[project.scripts]`` (a small Python
file calling ``<module>:main``) so the test does not depend on how mqb was installed, and they run from a folder
outside the repository, as an installed command does. The completion function the install script defines is called
the way bash calls it (``COMP_LINE``, ``COMP_POINT``, ``COMP_WORDS``, ``COMP_CWORD``), as Hydra's own tests do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

#: what pip writes for a [project.scripts] entry
SCRIPT = """#!{python}
import re
import sys
from {module} import {func}
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit({func}())
"""

#: bash: install the completion, then ask it like bash does for each line given as an argument
ASK = r"""

eval "$("$1" -sc install=bash)"
complete -p "$1"
shift
for line in "$@"; do
    COMP_LINE="$line"
    COMP_POINT=${#COMP_LINE}
    read -ra COMP_WORDS <<< "$COMP_LINE"
    if [[ "$COMP_LINE" == *" " ]]; then COMP_WORDS+=(""); fi
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMPREPLY=()
    hydra_bash_completion
    printf 'ASKED %s\t%s\n' "$line" "${COMPREPLY[*]}"
done
"""


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> Path:
    """A folder with mqb's console scripts as pip would write them."""
    bin_dir = tmp_path_factory.mktemp("bin")
    entries = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in entries.items():
        module, _, func = target.partition(":")
        path = bin_dir / name
        path.write_text(SCRIPT.format(python=sys.executable, module=module, func=func))
        path.chmod(0o755)
    return bin_dir


def complete(scripts: Path, cwd: Path, program: str, *lines: str) -> tuple[str, dict[str, list[str]]]:
    """The completion rule bash registered for ``program``, and the completions of each line."""
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(["bash", "-c", ASK, "ask", program, *lines], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    answers = {}
    for out in proc.stdout.splitlines():
        if out.startswith("ASKED "):
            line, _, replies = out.removeprefix("ASKED ").partition("\t")
            answers[line] = sorted(replies.split())
    assert set(answers) == set(lines), proc.stdout + proc.stderr
    rule = next(x for x in proc.stdout.splitlines() if x.startswith("complete "))
    return rule, answers


def test_mqb_eval_completes_the_model_zoo(scripts, tmp_path):
    rule, answers = complete(scripts, tmp_path, "mqb-eval", "mqb-eval model=", "mqb-eval -m model=unet precision=w4",
                             "mqb-eval model=meshnet_1", "mqb-eval precision.wei")  # fmt: skip
    assert rule.endswith("-F hydra_bash_completion mqb-eval")
    assert answers["mqb-eval model="] == [f"model={m}" for m in MODELS]
    assert answers["mqb-eval -m model=unet precision=w4"] == ["precision=w4a16", "precision=w4a4", "precision=w4a8"]
    assert answers["mqb-eval model=meshnet_1"] == ["model=meshnet_104cls", "model=meshnet_18cls"]
    assert answers["mqb-eval precision.wei"] == ["precision.weight."]  # keys of the composed config too


def test_mqb_sensitivity_completes_models_and_its_own_keys(scripts, tmp_path):
    lines = ("mqb-sensitivity model=", "mqb-sensitivity per_layer --layers conv model=meshnet_1",
             "mqb-sensitivity sensitivity.mo", "mqb-sensitivity sensitivity.")  # fmt: skip
    _, answers = complete(scripts, tmp_path, "mqb-sensitivity", *lines)
    assert answers["mqb-sensitivity model="] == [f"model={m}" for m in MODELS]
    assert answers["mqb-sensitivity per_layer --layers conv model=meshnet_1"] == [
        "model=meshnet_104cls", "model=meshnet_18cls"
    ]  # fmt: skip
    assert answers["mqb-sensitivity sensitivity.mo"] == ["sensitivity.mode="]
    assert {"sensitivity.groups.", "sensitivity.mode=", "sensitivity.target_drop="} <= set(
        answers["mqb-sensitivity sensitivity."]
    )


def test_mqb_deploy_completes_its_command_and_groups(scripts, tmp_path):
    deploy_choices = sorted(p.stem for p in (CONF / "deploy").glob("*.yaml"))
    lines = ("mqb-deploy ", "mqb-deploy pro", "mqb-deploy profile deploy=", "mqb-deploy export model=unet")
    _, answers = complete(scripts, tmp_path, "mqb-deploy", *lines)
    assert {"export", "profile", "compare", "model=", "precision=", "deploy="} <= set(answers["mqb-deploy "])
    assert answers["mqb-deploy pro"] == ["profile"]
    assert answers["mqb-deploy profile deploy="] == [f"deploy={d}" for d in deploy_choices]
    assert answers["mqb-deploy export model=unet"] == ["model=unet", "model=unetr"]


def test_console_scripts_run_outside_the_repository(scripts, tmp_path):
    """A console script's folder, not the repository, comes first on its path: mqb's Hydra plugins
    (``hydra/sweeper=mqb_grid``, the eval config's default) must still be found."""
    env = {**os.environ, "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for program, expected in (("mqb-eval", "name: unet"), ("mqb-sensitivity", "mode: incremental")):
        proc = subprocess.run([program, "--cfg", "job"], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0 and expected in proc.stdout, proc.stderr[-3000:]
