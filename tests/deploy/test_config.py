"""The ``deploy`` config group: every choice composes onto the schema, bad values are refused before any work,
and no deploy setting changes an evaluation's config id."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from mqb.config import CONF_DIR, DEPLOY_RUNTIMES, DEPLOY_SCHEMES, DeployConfig, compose_eval
from mqb.deploy.__main__ import main
from mqb.results import config_id

CHOICES = sorted(p.stem for p in (CONF_DIR / "deploy").glob("*.yaml"))


def test_the_group_has_its_choices_and_cpu_is_the_default() -> None:
    assert CHOICES == ["cpu", "onnxruntime", "openvino", "tensorrt"]
    deploy = compose_eval([]).deploy
    assert deploy.name == "cpu" and list(deploy.runtimes) == list(DEPLOY_RUNTIMES)
    assert deploy.scheme == "deploy" and deploy.narrow_range and deploy.share_quantization and not deploy.strict
    assert deploy.profile.repeats == 5 and deploy.profile.volume and deploy.out is None and deploy.axiswise_norms


@pytest.mark.parametrize("choice", CHOICES)
def test_every_choice_composes_onto_the_schema(choice: str) -> None:
    cfg = compose_eval([f"deploy={choice}"])
    deploy = cfg.deploy
    assert deploy.name == choice
    assert OmegaConf.get_type(deploy) is DeployConfig  # typed: a wrong key or type fails at composition
    assert deploy.runtimes and set(deploy.runtimes) <= set(DEPLOY_RUNTIMES)
    assert deploy.scheme in DEPLOY_SCHEMES
    if choice != "cpu":
        assert list(deploy.runtimes) == [choice]
    # what the file sets is all schema keys, so a typo in a YAML (or an override) fails at composition
    yaml_keys = set(OmegaConf.load(CONF_DIR / "deploy" / f"{choice}.yaml"))
    assert yaml_keys <= set(OmegaConf.structured(DeployConfig))


def test_keys_override_and_are_typed() -> None:
    cfg = compose_eval(["deploy=openvino", "deploy.profile.repeats=10", "deploy.strict=true", "deploy.out=/x"])
    assert cfg.deploy.profile.repeats == 10 and cfg.deploy.strict is True and cfg.deploy.out == "/x"
    with pytest.raises(Exception, match="repeatz"):
        compose_eval(["deploy.profile.repeatz=3"])
    with pytest.raises(Exception, match="repeats"):
        compose_eval(["deploy.profile.repeats=many"])


@pytest.mark.parametrize(
    "override,key,valid",
    [
        ("deploy.scheme=per_voxel", "deploy.scheme", DEPLOY_SCHEMES),
        ("deploy.runtimes=[onnxruntime,tvm]", "deploy.runtimes", DEPLOY_RUNTIMES),
    ],
)
@pytest.mark.parametrize("command", ["export", "profile"])
def test_a_bad_value_exits_2_naming_the_key_and_the_valid_values(
    command: str, override: str, key: str, valid: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert main([command, override, f"deploy.out={out}"]) == 2
    err = capsys.readouterr().err
    bad = "per_voxel" if "scheme" in override else "tvm"
    assert key in err and bad in err and all(v in err for v in valid), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_wrong_deploy_choice_or_key_exits_2_with_the_valid_ones(capsys: pytest.CaptureFixture) -> None:
    assert main(["export", "deploy=gpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown deploy 'gpu'" in err and all(c in err for c in CHOICES)
    assert main(["export", "deploy.profile.repeatz=3"]) == 2
    err = capsys.readouterr().err
    assert "deploy.profile has no 'repeatz'" in err and "volume_repeats" in err


def test_deploy_settings_do_not_change_the_config_id() -> None:
    ids = {
        overrides: config_id(compose_eval(list(overrides)))
        for overrides in [
            ("deploy=cpu",),
            ("deploy=openvino",),
            ("deploy=tensorrt", "deploy.scheme=as_configured", "deploy.strict=true", "deploy.out=/tmp/x"),
            ("deploy.profile.repeats=9",),
            (),
        ]
    }
    assert len(set(ids.values())) == 1, ids
    # the id still sees what the evaluation computes
    assert config_id(compose_eval(["deploy=openvino", "precision=w4a4"])) != ids[("deploy=openvino",)]
    assert config_id(compose_eval(["deploy.profile.repeats=9", "granularity=adaptive"])) != ids[()]
