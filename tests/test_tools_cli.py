"""``mqb.sensitivity``, ``mqb.activations`` and ``mqb.deploy`` as Hydra apps (``conf/<tool>.yaml``: the eval config plus
the tool's own typed node, :mod:`mqb.tool_config`): ``--help`` lists the groups and the tool's keys before torch is
imported, ``--cfg job`` prints the tool's node, a wrong option exits 2 naming the key and the valid values, the
earlier command lines (first word, ``--groups a b``) still work, and the eval part of a tool's config is exactly
``mqb.eval``'s (same record ids). The runs themselves: tests/analysis/test_sensitivity.py, tests/deploy/."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mqb.cli import ArgvError, quote, tool_config, translate
from mqb.config import CONF_DIR, compose_eval
from mqb.results import config_id
from mqb.tool_config import (
    ACTIVATIONS,
    DEPLOY,
    OVERFLOW_FIX,
    SENSITIVITY,
    ActivationsOptions,
    SensitivityOptions,
    compose_tool,
    option_problem,
)

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "monai", "lightning", "scipy")
MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def _main(tool_prog: str):
    if tool_prog == "mqb.sensitivity":
        from mqb.sensitivity import main
    elif tool_prog == "mqb.activations":
        from mqb.activations import main
    else:
        from mqb.deploy.__main__ import main
    return main


def _run_module(module: str, *argv: str) -> tuple[int, str, list[str]]:
    """Run ``python -m module argv`` in a fresh interpreter: exit status, output, and which heavy modules it
    imported."""
    code = textwrap.dedent(f"""
        import json, runpy, sys
        sys.argv = [{module!r}, *{list(argv)!r}]
        code = 0
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        print("HEAVY=" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
        sys.exit(code)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("HEAVY="))
    return proc.returncode, proc.stdout + proc.stderr, json.loads(line.removeprefix("HEAVY="))


HELP_KEYS = {"mqb.sensitivity": ["sensitivity.mode=incremental|per_layer|mixed", "sensitivity.groups", "--groups"],
             "mqb.activations": ["activations.layers", "activations.out", "--layers"],
             "mqb.deploy": ["deploy.command=export|profile|compare", "deploy.profile.repeats"]}  # fmt: skip


@pytest.mark.parametrize(
    "module",
    [
        "mqb.sensitivity",
        "mqb.activations",
        "mqb.deploy",
    ],
)  # fmt: skip
def test_help_lists_the_groups_and_the_tools_keys_before_torch(module):
    code, out, heavy = _run_module(module, "--help")
    assert code == 0, out
    assert "== Config groups ==" in out and f"model: {', '.join(MODELS)}" in out
    assert "precision:" in out and "deploy: cpu, onnxruntime, openvino, tensorrt" in out
    for key in HELP_KEYS[module]:
        assert key in out, key
    assert heavy == [], f"{module} --help imported {heavy}"


def test_cfg_job_and_errors_come_before_torch():
    code, out, heavy = _run_module("mqb.sensitivity", "per_layer", "--cfg", "job", "model=unetr", "--max-layers", "3")
    assert code == 0 and heavy == [], (heavy, out)
    node = yaml.safe_load(out[: out.index("HEAVY=")])["sensitivity"]
    assert node["mode"] == "per_layer" and node["max_layers"] == 3
    code, out, heavy = _run_module("mqb.activations", "activations.plot=-1")
    assert code == 2 and heavy == [] and "activations.plot=-1: must be >= 0" in out, out


def _cfg_job(capsys, tool_prog: str, *argv: str) -> dict:
    assert _main(tool_prog)(["--cfg", "job", *argv]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_cfg_job_prints_the_sensitivity_node(capsys):
    cfg = _cfg_job(capsys, "mqb.sensitivity", "model=segresnet", "precision=w4a4")
    assert cfg["sensitivity"] == OmegaConf.to_container(OmegaConf.structured(SensitivityOptions))
    assert cfg["model"]["name"] == "segresnet" and cfg["precision"]["name"] == "w4a4"
    # the earlier command line: the first word and the argparse options, anywhere (also after the overrides)
    cfg = _cfg_job(capsys, "mqb.sensitivity", "mixed", "model=unet", "--layers", "conv3x3x3", "name:model.0*",
                   "--target-drop", "2", "--keep", "w8a16", "--no-proxies", "--label", "3x3x3 it's")  # fmt: skip
    node = cfg["sensitivity"]
    assert node["mode"] == "mixed" and node["layers"] == ["conv3x3x3", "name:model.0*"]
    assert node["target_drop"] == 2.0 and node["keep"] == "w8a16" and node["proxies"] is False
    assert node["label"] == "3x3x3 it's"
    # the Hydra form
    cfg = _cfg_job(capsys, "mqb.sensitivity", "sensitivity.mode=per_layer", "sensitivity.groups=[conv1x1x1,linear]")
    assert cfg["sensitivity"]["mode"] == "per_layer" and cfg["sensitivity"]["groups"] == ["conv1x1x1", "linear"]


def test_cfg_job_prints_the_activations_and_deploy_nodes(capsys):
    cfg = _cfg_job(capsys, "mqb.activations", "model=meshnet_18cls", "dataset=brain_aseg_sample", "--layers", "conv",
                   "--out", "outputs/act", "--max-batches", "2")  # fmt: skip
    assert cfg["activations"] == {**OmegaConf.to_container(OmegaConf.structured(ActivationsOptions)),
                                  "layers": ["conv"], "out": "outputs/act", "max_batches": 2}  # fmt: skip
    cfg = _cfg_job(capsys, "mqb.deploy", "profile", "model=nnunet", "deploy=openvino", "deploy.profile.repeats=10")
    deploy = cfg["deploy"]
    assert deploy["command"] == "profile" and deploy["name"] == "openvino" and deploy["runtimes"] == ["openvino"]
    assert deploy["profile"]["repeats"] == 10 and deploy["scheme"] == "deploy"
    assert _cfg_job(capsys, "mqb.deploy")["deploy"]["command"] == "export"


MODES = "incremental, per_layer, mixed"


@pytest.mark.parametrize(
    "tool_prog,argv,expected",
    [
        ("mqb.sensitivity", ["sensitivity.mode=sideways"], ["sensitivity.mode", "'sideways'", MODES]),
        ("mqb.sensitivity", ["sideways", "model=unet"], ["sensitivity.mode", "'sideways'", MODES]),
        ("mqb.sensitivity", ["-m", "sensitivity.mode=incremental,sideways"], ["sensitivity.mode", "'sideways'", MODES]),
        ("mqb.sensitivity", ["sensitivity.max_layers=many"], ["sensitivity.max_layers", "'many'", "Integer"]),
        ("mqb.sensitivity", ["--max-layers", "0"], ["sensitivity.max_layers=0", "must be >= 1"]),
        ("mqb.sensitivity", ["sensitivity.groupz=[conv]"], ["sensitivity has no 'groupz'", "groups, keep, label"]),
        ("mqb.sensitivity", ["incremental", "per_layer"], ["unexpected argument 'per_layer'", "key=value"]),
        ("mqb.sensitivity", ["--groups"], ["--groups needs a value", "sensitivity.groups"]),
        ("mqb.activations", ["activations.alpha=1.5"], ["activations.alpha=1.5", "must be in [0, 1]"]),
        ("mqb.activations", ["conv"], ["unexpected argument 'conv'", "activations.<key>="]),
        ("mqb.activations", ["activations.layer=[conv]"], ["activations has no 'layer'", "layers, max_batches"]),
        ("mqb.deploy", ["exprt"], ["deploy.command", "'exprt'", "export, profile, compare"]),
        ("mqb.deploy", ["deploy.command=run"], ["deploy.command", "'run'", "export, profile, compare"]),
        ("mqb.deploy", ["export", "deploy.overflow_fix=sometimes"], ["deploy.overflow_fix", "auto, enable, disable"]),
        ("mqb.deploy", ["export", "deploy.comand=profile"], ["deploy has no 'comand'", "command"]),
        ("mqb.deploy", ["export", "model=unetx"], ["unknown model 'unetx'", "valid model choices", "meshnet_18cls"]),
    ],
)  # fmt: skip
def test_a_wrong_option_exits_2_naming_the_key_and_the_valid_values(tool_prog, argv, expected, capsys, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # nothing is run: no Hydra output folder either
    assert _main(tool_prog)(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{tool_prog}: error: ")
    for text in expected:
        assert text in err, (text, err)
    assert list(tmp_path.iterdir()) == []


def test_translate_keeps_hydra_options_and_places_the_shorthands():
    t = translate(SENSITIVITY, ["-m", "per_layer,incremental", "--cfg", "job", "model=unet", "--layers", "conv",
                                "!name:enc*", "precision=w4a4", "-cd", "my_conf", "--info", "defaults",
                                "--max-layers=3"])  # fmt: skip
    assert t == ["-m", "sensitivity.mode=per_layer,incremental", "--cfg", "job", "model=unet",
                 "sensitivity.layers=['conv','!name:enc*']", "precision=w4a4", "-cd", "my_conf", "--info", "defaults",
                 "sensitivity.max_layers='3'"]  # fmt: skip
    assert translate(DEPLOY, ["profile", "deploy=openvino"]) == ["deploy.command=profile", "deploy=openvino"]
    assert translate(ACTIVATIONS, ["--info", "model=unet"]) == ["--info", "model=unet"]  # --info's value is optional
    with pytest.raises(ArgvError, match="unexpected argument 'two'"):
        translate(DEPLOY, ["export", "two"])


@pytest.mark.parametrize("text", ["3x3x3 conv", "it's", "back\\slash", "end\\", "quote\\'d", "name:a.b*", "!conv"])
def test_quoted_values_come_back_as_written(text):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    assert OverridesParser.create().parse_override(f"k={quote(text)}").value() == text


@pytest.mark.parametrize(
    "overrides",
    [(), ("model=segresnet", "precision=w4a4", "granularity=adaptive"), ("experiment=int8_deploy", "model=nnunet"),
     ("deploy=openvino", "method=smoothquant", "calibration=percentile")],
)  # fmt: skip
def test_a_tools_eval_config_is_mqb_evals(overrides):
    """A sensitivity step, an activation report and a deploy run compose exactly the mqb.eval config: the same
    record ids, sharing baselines, calibration and records with any sweep."""
    reference = compose_eval(list(overrides))
    for tool in (SENSITIVITY, ACTIVATIONS, DEPLOY):
        cfg = compose_tool(tool, list(overrides))
        eval_cfg, options = tool_config(cfg, tool)
        assert config_id(eval_cfg) == config_id(reference), tool.prog
        plain = OmegaConf.to_container(eval_cfg, resolve=False)
        if tool is DEPLOY:
            assert plain["deploy"].pop("command") == "export"
        assert plain == OmegaConf.to_container(reference, resolve=False), tool.prog
        assert tool.node in cfg and (tool is DEPLOY or tool.node not in eval_cfg)


def test_the_tools_node_is_typed_and_checked_where_the_task_reads_it():
    with pytest.raises(Exception, match="max_layers"):
        compose_tool(SENSITIVITY, ["sensitivity.max_layers=many"])
    with pytest.raises(Exception, match="groupz"):
        compose_tool(SENSITIVITY, ["sensitivity.groupz=[a]"])
    # values that bypass the command-line check (an experiment, a YAML, compose): the task refuses them
    cfg = compose_tool(DEPLOY, ["deploy.scheme=per_voxel", "deploy.command=profile"])
    with pytest.raises(ValueError, match="deploy.scheme: 'per_voxel' is not valid; valid: deploy, as_configured"):
        tool_config(cfg, DEPLOY)
    with pytest.raises(ValueError, match="sensitivity.mode: 'up' is not valid"):
        tool_config(compose_tool(SENSITIVITY, ["sensitivity.mode=up"]), SENSITIVITY)
    assert option_problem("deploy.runtimes", ["onnxruntime", "tvm"]) == (
        "deploy.runtimes: 'tvm' is not valid; valid: onnxruntime, openvino, tensorrt"
    )


def test_overflow_fix_values_are_the_isas():
    from mqb.deploy.isa import OVERFLOW_FIX as ISA_OVERFLOW_FIX

    assert OVERFLOW_FIX == ISA_OVERFLOW_FIX


def _argparse_study_args(argv: list[str]) -> dict[str, str]:
    """What ``mqb.sensitivity`` recorded as the study's ``args`` before it became a Hydra app (its parser)."""
    groups = ["conv1x3x3", "conv1x1x1", "conv3x3x3", "linear", "attention"]
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("incremental", "per_layer", "mixed"))
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--groups", nargs="+", default=groups)
    parser.add_argument("--layers", nargs="+", default=["conv", "conv_transpose", "linear"])
    parser.add_argument("--label", default="layer")
    parser.add_argument("--max-layers", type=int, default=None)
    parser.add_argument("--no-proxies", action="store_true")
    parser.add_argument("--target-drop", type=float, default=1.0)
    parser.add_argument("--keep", default="w8a8")
    parser.add_argument("--ranking-from", type=Path, default=None)
    args = parser.parse_args(argv)
    return {k: str(v) for k, v in vars(args).items() if k != "overrides"}


@pytest.mark.parametrize(
    "argv",
    [["incremental"], ["incremental", "--groups", "conv3x3x3", "conv_transpose"],
     ["per_layer", "--layers", "conv_transpose", "--max-layers", "2", "--label", "3x3x3 conv", "--no-proxies"],
     ["mixed", "--target-drop", "2", "--keep", "w8a16", "--ranking-from", "outputs/sensitivity/per_layer-x.json"]],
)  # fmt: skip
def test_a_study_keeps_its_file_name(argv):
    """The study file is named by a hash of its settings: the Hydra app records them as the argparse program did."""
    from mqb.sensitivity import study_args

    cfg = compose_tool(SENSITIVITY, translate(SENSITIVITY, argv))
    assert study_args(cfg.sensitivity) == _argparse_study_args(argv)


def test_every_console_script_is_a_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert sorted(scripts) == sorted(["mqb-eval", "mqb-train", "mqb-sweep", "mqb-report", "mqb-sensitivity",
                                      "mqb-activations", "mqb-deploy", "mqb-models"])  # fmt: skip
    for name, target in scripts.items():
        module, _, func = target.partition(":")
        assert module == f"mqb.{name.removeprefix('mqb-')}" or module.endswith(".__main__"), (name, target)
        assert func == "main" and (ROOT / (module.replace(".", "/") + ".py")).is_file(), (name, target)


@pytest.mark.slow
def test_sensitivity_sweeps_one_study_per_model(tmp_path):
    """``-m``: one study per model, in a sweep folder, each job named by its mode and model; a job that fails (a
    float precision has nothing to study) fails the sweep at the end, after the others ran."""
    args = [sys.executable, "-m", "mqb.sensitivity", "-m", "per_layer", "model=unet,segresnet", "precision=fp32",
            "logger=none", f"paths.output_dir={tmp_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.split("_")[:3] for j in jobs] == [["0", "per", "layer"], ["1", "per", "layer"]]
    assert "unet" in jobs[0] and "segresnet" in jobs[1]
    assert "float precision" in proc.stdout + proc.stderr


def test_hydra_options_may_come_after_the_overrides():
    """Hydra's parser takes one run of overrides: mqb moves its options (``--cfg job``, ``-m`` ...) before them."""
    from mqb.cli import with_launchers

    out = with_launchers(["prog", "model=unet", "--cfg", "job", "precision=w4a4", "-m", "--info"])
    assert out[:5] == ["prog", "--cfg", "job", "-m", "--info"] and out[-2:] == ["model=unet", "precision=w4a4"]
    assert out[5].startswith("hydra.searchpath=[file://") and out[5].endswith("launchers]")


@pytest.mark.slow
def test_activations_cli_writes_its_report(tmp_path):
    """The README's command line (``--layers``), through the Hydra app: the statistics, the scatter and a heat map."""
    args = [sys.executable, "-m", "mqb.activations", "model=unet", "model.checkpoint=null",
            "model.net.channels=[4,8,16]", "model.net.strides=[2,2]", "model.net.num_res_units=1",
            "dataset.source.num_cases=6", "dataset.source.shape=[32,32,32]", "dataset.roi_size=[32,32,32]",
            "dataset.splits={test: 1, calib: 1, val: 1}", "calibration.num_volumes=1", "trainer.progress=false",
            f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
            "--layers", "conv", "--plot", "1"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = tmp_path / "activations" / "unet-synthetic"
    assert (out / "activation_stats.csv").is_file() and (out / "kurtosis_scatter.png").is_file()
    assert len(list(out.glob("outliers_*.png"))) == 1
    (run,) = (tmp_path / "runs").glob("*_activations_unet_synthetic")
    assert (run / ".hydra" / "config.yaml").is_file()
