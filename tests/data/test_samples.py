"""The real samples ship with mqb: ``data/`` in the repository, ``mqb/_samples`` in a wheel, found by
``paths.data_dir``'s default (:func:`mqb.samples.shipped_data_dir`) in both; missing samples name the setting."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

import mqb
from mqb.checkpoints import CheckpointError, load_weights, read_state_dict
from mqb.cli import unknown_key
from mqb.config import CONF_DIR, PathsConfig, register_configs
from mqb.samples import SAMPLE_FOLDERS, missing_sample_hint, sample_data_dir, shipped_data_dir

register_configs()
REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
MESHNET_18 = "brainchop_t1_meshnet/models/model18cls/model.safetensors"


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("eval", overrides=list(overrides))


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _config_samples() -> set[str]:
    """Every ``${paths.data_dir}/...`` file the YAML configs name (relative to the samples folder)."""
    found = set()
    for path in CONF_DIR.rglob("*.yaml"):
        found |= set(re.findall(r"\$\{paths\.data_dir\}/(\S+)", path.read_text()))
    return found


def test_editable_install_finds_the_repository_data_folder():
    assert Path(mqb.__file__).resolve().parent == REPO / "mqb"  # this checkout's mqb (editable install)
    assert shipped_data_dir() == DATA
    assert PathsConfig().data_dir == str(DATA)
    cfg = _compose("model=meshnet_18cls", "dataset=brain_aseg_sample")
    assert cfg.paths.data_dir == str(DATA)
    assert cfg.model.checkpoint == str(DATA / MESHNET_18) and Path(cfg.model.checkpoint).is_file()
    assert cfg.dataset.source.data_dir == str(DATA)


def test_the_shipped_set_is_complete_small_and_documented():
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == sorted(SAMPLE_FOLDERS)
    assert (DATA / "README.md").is_file() and (DATA / "NOT_SHIPPED.md").is_file()
    for folder in SAMPLE_FOLDERS:
        names = [p.name for p in (DATA / folder).iterdir()]
        assert "PROVENANCE.md" in names, folder
        assert any(n.startswith(("LICENSE", "COPYING")) for n in names), f"{folder} has no licence file"
    samples = _config_samples()
    assert MESHNET_18 in samples and len(samples) == 5  # the five MeshNet checkpoints
    missing = sorted(s for s in samples if not (DATA / s).is_file())
    assert not missing, f"configs name samples that data/ lacks: {missing}"
    size = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    assert size < 20e6, f"data/ holds {size / 1e6:.1f} MB; keep the shipped samples small"


def test_pyproject_packages_every_mqb_package_and_the_samples():
    """pyproject.toml lists the packages (to map data/ onto mqb/_samples); a new subpackage must be listed (also
    mqb's Hydra plugins, which live in Hydra's ``hydra_plugins`` namespace)."""
    from setuptools import find_namespace_packages

    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    on_disk = set(find_namespace_packages(where=str(REPO), include=["mqb", "mqb.*", "hydra_plugins.*"]))
    mapped = {"mqb._samples": "data", "mqb._conf": "conf", "mqb._launchers": "launchers"}  # top-level folders
    assert set(setuptools_cfg["packages"]) == on_disk | set(mapped), "update [tool.setuptools] packages"
    assert setuptools_cfg["package-dir"] == mapped
    patterns = setuptools_cfg["package-data"]["mqb._samples"]
    assert {f"{folder}/**/*" for folder in SAMPLE_FOLDERS} <= set(patterns)
    ignore = (REPO / ".gitignore").read_text().splitlines()
    assert {f"!/data/{folder}/" for folder in SAMPLE_FOLDERS} <= set(ignore)  # not ignored in a clone


def test_the_old_setting_is_gone_and_the_message_names_the_new_one(tmp_path):
    with pytest.raises(ConfigCompositionException):
        _compose(f"paths.shared_data={tmp_path}")
    message = unknown_key("paths.shared_data")
    assert message is not None and "paths has no 'shared_data'" in message and "data_dir" in message


def test_a_missing_checkpoint_names_the_setting(tmp_path):
    nowhere = tmp_path / "nowhere"
    cfg = _compose("model=meshnet_18cls", "dataset=brain_aseg_sample", f"paths.data_dir={nowhere}")
    assert cfg.model.checkpoint == str(nowhere / MESHNET_18)
    net = instantiate(cfg.model.net)
    with pytest.raises(CheckpointError) as err:
        load_weights(net, cfg.model.checkpoint)
    message = str(err.value)
    assert f"checkpoint '{nowhere / MESHNET_18}' does not exist" in message
    assert f"paths.data_dir='{nowhere}' (no samples there); set paths.data_dir" in message
    assert "or set model.checkpoint" in message and f"ships them in '{DATA}'" in message
    with pytest.raises(CheckpointError, match="does not exist \\(model.checkpoint\\); give a path to a file$"):
        read_state_dict(tmp_path / "mine.safetensors")  # not a shipped sample: no samples hint


def test_sample_paths_and_hint():
    assert sample_data_dir(DATA / MESHNET_18) == DATA
    assert sample_data_dir("/x/y/voxelmorph_brain_t1_aseg/test_scan_t1.nii.gz") == Path("/x/y")
    assert sample_data_dir("/x/y/model.safetensors") is None
    assert missing_sample_hint() == (
        f"the shipped samples are read from paths.data_dir='{DATA}'; set paths.data_dir to the folder holding them"
    )


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel of this checkout, built offline from a clean copy of what setuptools reads (no build/ leftovers)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((REPO / name).read_bytes())
    for name in ("mqb", "data", "hydra_plugins", "conf", "launchers"):
        for path in (REPO / name).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                target = src / path.relative_to(REPO)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(dist), str(src)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = dist.glob("mqb-*.whl")
    return wheel


@pytest.mark.slow
def test_a_wheel_carries_the_samples_and_an_installed_mqb_finds_them(tmp_path):
    wheel = _build_wheel(tmp_path)
    shipped = sorted(str(p.relative_to(DATA)).replace(os.sep, "/") for p in DATA.rglob("*") if p.is_file())
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert {f"mqb/_samples/{name}" for name in shipped} <= names
    assert "mqb/data/tables/totalsegmentator_v2_total.json" in names
    assert "hydra_plugins/mqb_sweeps/pool_launcher.py" in names  # hydra/launcher=mqb_pool in an installed mqb
    assert not any(n.startswith(("data/", "mqb/_samples/__pycache__")) for n in names)
    configs = sorted(str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml"))
    assert {f"mqb/_conf/{name}" for name in configs} <= names  # the Hydra configs: mqb.eval runs in a wheel install
    assert "mqb/_launchers/cluster/example_gpu.yaml" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    probe = (
        "import mqb, mqb.samples, mqb.config;"
        "from mqb.checkpoints import read_state_dict;"
        "d = mqb.samples.shipped_data_dir();"
        "print(mqb.__file__); print(d); print(mqb.config.PathsConfig().data_dir);"
        f"print(len(read_state_dict(d / {MESHNET_18!r})))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    ).stdout.split()
    installed = site / "mqb"
    assert Path(out[0]).resolve().parent == installed.resolve()  # the wheel's mqb, not this checkout's
    assert Path(out[1]) == installed / "_samples" and out[2] == out[1]
    assert int(out[3]) == len(read_state_dict(DATA / MESHNET_18))
    # the installed configs: a config composes and prints from the wheel's mqb (no checkout on the path)
    job = subprocess.run(
        [sys.executable, "-m", "mqb.eval", "--cfg", "job", "model=meshnet_18cls", "dataset=brain_aseg_sample",
         "+cluster=cpu_small"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-2000:]
    job = job.stdout
    assert "name: meshnet_18cls" in job and str(installed / "_samples") in job
    assert torch.equal(
        read_state_dict(installed / "_samples" / MESHNET_18)["model.0.weight"],
        read_state_dict(DATA / MESHNET_18)["model.0.weight"],
    )
