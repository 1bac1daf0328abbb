"""Start-up: help, the composed config, command-line errors and the readers of records come before torch, MONAI,
Lightning and SciPy are imported (seconds, not tens of seconds, on a small CPU). Checked by what is imported, not
by the clock (wall time on a shared machine is no test); ``benchmarks/startup.py`` measures the seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.test_eval_cli import ROOT

HEAVY = ("torch", "monai", "lightning", "scipy")


def _imported_heavy(module: str, *argv: str) -> tuple[list[str], str]:
    code = textwrap.dedent(f"""
        import json, runpy, sys
        sys.argv = [{module!r}, *{list(argv)!r}]
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        print("HEAVY=" + json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("HEAVY="))
    return json.loads(line.removeprefix("HEAVY=")), proc.stdout + proc.stderr


@pytest.mark.parametrize(
    "argv",
    [("--help",), ("--cfg", "job", "model=unetr", "precision=w4a4"), ("model=no_such_model",),
     ("precision.weight.bitz=4",)],
)  # fmt: skip
def test_eval_answers_before_importing_torch(argv):
    heavy, out = _imported_heavy("mqb.eval", *argv)
    assert heavy == [], f"mqb.eval {' '.join(argv)} imported {heavy}"
    if argv == ("--help",):
        assert "== Config groups ==" in out and "unetr" in out
    if argv[0] == "--cfg":
        assert "name: unetr" in out
    if argv == ("model=no_such_model",):
        assert "unknown model 'no_such_model'" in out and "valid model choices" in out


def test_sweep_readers_import_neither_torch_nor_scipy(tmp_path):
    record = {"id": "a" * 16, "status": "success", "model": "unet", "dataset": "synthetic", "precision": "w8a8",
              "granularity": "per_tensor", "method": "rtn", "metrics": {"dsc": 0.5, "nsd": 0.5, "hd95": 1.0},
              "delta_pct": {"dsc": 1.0, "nsd": 1.0, "hd95": 1.0}, "config": {}}  # fmt: skip
    (tmp_path / f"{record['id']}.json").write_text(json.dumps(record))
    for command in ("status", "summary"):
        extra = ["--out", str(tmp_path / "s")] if command == "summary" else []
        heavy, out = _imported_heavy("mqb.sweep", command, str(tmp_path), *extra)
        assert heavy == [], f"mqb.sweep {command} imported {heavy}:\n{out}"
