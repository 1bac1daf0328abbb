"""The self-contained HTML report (``python -m mqb.report RESULTS --html``), read as text and rendered by Chromium.

The expected cells are computed here from the records' own numbers (value, Δ% = 100 (FP32 - quantized) / FP32,
the stats section's interval), not copied from the page.
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mqb.analysis.html import HTML_FILE, anchor, machines, render_html, write_html
from mqb.analysis.report import build_report
from mqb.analysis.stats import compare
from mqb.report import main
from mqb.results import read_records, write_json_atomic
from tests.analysis.test_report import CLASSES, FP32_CASES, PNG_MAGIC, per_case_record, record

HOSTS = {
    "a": {"hostname": "node-a", "platform": "Linux-6.1-x86_64", "cpu_count": 2, "python": "3.11.7",
          "torch": "2.13.0+cpu", "mqb": "0.1.0"},
    "b": {"hostname": "gpu-b", "platform": "Linux-5.15-x86_64", "cpu_count": 64, "python": "3.11.9",
          "torch": "2.13.0+cu126", "mqb": "0.1.0"},
}  # fmt: skip
EVIL = '<script>alert("x")</script> & <b>bold</b>'
CONFIG = {"method": {"name": "rtn", "exclude": []}, "calibration": {"name": "minmax"}, "seed": 0,
          "paths": {"output_dir": "/out"}}  # fmt: skip


def quantized(rid: str, drops: list[float], exclude: list[str], host: str) -> dict:
    """A W4A4 per-channel record whose liver loses ``drops`` per case (the other classes unchanged)."""
    values = {c: [v[0] - d, v[1], v[2]] for (c, v), d in zip(FP32_CASES.items(), drops, strict=True)}
    r = per_case_record(rid, "w4a4", values)
    r["config"] = {**CONFIG, "method": {"name": "rtn", "exclude": exclude}, "dataset": r["config"]["dataset"]}
    r["host"], r["device"] = HOSTS[host], {"type": "cpu" if host == "a" else "cuda", "fp32_precision": "ieee"}
    r["git"] = {"commit": "0123456789abcdef" + host, "dirty": host == "b"}
    return r


def make_records() -> list[dict]:
    """FP32 + two W4A4 per-channel configs that differ only in method.exclude (Table 11's case) with per-case
    values and stats sections, an untrained W8A8 config of another model, and a failed config."""
    fp32 = per_case_record("fp32", "fp32", FP32_CASES)
    fp32["config"] = {**CONFIG, "dataset": fp32["config"]["dataset"]}
    plain = quantized("w4-plain", [0.1, 0.2, 0.15, 0.15, 0.1, 0.3], [], "a")
    kept = quantized("w4-keep-1x1", [0.01, 0.02, -0.01, 0.0, 0.01, 0.02], ["conv1x1x1"], "b")
    for r in (plain, kept):
        r["stats"] = compare(fp32["metrics"], r["metrics"], n_resamples=500, class_names=CLASSES)
    untrained = record("u8", "swin_unetr", "w8a8", "adaptive", 0.02, 0.03, untrained=True,
                       baseline={"dsc": 0.013, "nsd": 0.016, "hd95": 9.0, "key": "random"})  # fmt: skip
    for r in (fp32, untrained):  # computed where plain was
        r.update(host=plain["host"], device=plain["device"], git=plain["git"])
    failed = {"id": "boom", "status": "error", "created": "2026-01-01T00:00:00", "model": "unet", "dataset": "btcv",
              "precision": "w4a8", "granularity": "per_voxel", "method": "rtn", "host": HOSTS["b"],
              "error": f"RuntimeError: {EVIL}\nTraceback (most recent call last):\n  line 2"}  # fmt: skip
    return [fp32, plain, kept, untrained, failed]


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    for r in make_records():
        write_json_atomic(folder / (f"{r['id']}.error.json" if r["status"] == "error" else f"{r['id']}.json"), r)
    return folder


class Page(HTMLParser):
    """The tables (rows of cell texts, with their <tr> attributes), images and links of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: list[list[tuple[dict, list[str]]]] = []
        self.images: list[dict] = []
        self.links: list[str] = []
        self.body: dict = {}
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append((a, []))
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        if "href" in a:
            self.links.append(a["href"])
        if "src" in a and tag != "img":
            self.links.append(a["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1][1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table_with(self, first_header: str) -> list[tuple[dict, list[str]]]:
        return next(t for t in self.tables if t and t[0][1] and t[0][1][0] == first_header)


def expected_cell(r: dict, metric: str = "dsc") -> str:
    mean = r["stats"][metric]["mean"]
    return (f"{r['metrics'][metric]:.3f} ({r['delta_pct'][metric]:.1f}% [{mean['drop_pct_ci_low']:.1f}, "
            f"{mean['drop_pct_ci_high']:.1f}]")  # fmt: skip


def check_headline(page: Page, records: list[dict]) -> None:
    """The headline table: one row per success record (FP32 rows included), the two W4A4 rows told apart by
    method.exclude, cells with the interval, the untrained row flagged."""
    table = page.table_with("Architecture")
    header = table[0][1]
    assert header[:4] == ["Architecture", "Dataset", "Precision", "Quant-Granularity"]
    assert header[-4:] == ["DSC (↓Δ% [95% CI])", "NSD (↓Δ% [95% CI])", "Note", "Config"] and "Setting" in header
    by_id = {attrs["data-id"]: cells for attrs, cells in table[1:]}
    classes = {attrs["data-id"]: attrs.get("class", "") for attrs, _ in table[1:]}
    assert set(by_id) == {"fp32", "w4-plain", "w4-keep-1x1", "u8", ""}  # "": the untrained group's FP32 (baseline)
    plain, kept = (next(r for r in records if r["id"] == i) for i in ("w4-plain", "w4-keep-1x1"))
    assert "method.exclude=[]" in by_id["w4-plain"] and "method.exclude=[conv1x1x1]" in by_id["w4-keep-1x1"]
    for r in (plain, kept):
        assert any(c.startswith(expected_cell(r)) for c in by_id[r["id"]]), (expected_cell(r), by_id[r["id"]])
        assert by_id[r["id"]][-1] == r["id"]
    assert "UNTRAINED" in by_id["u8"] and "untrained" in classes["u8"] and "reference" in classes["fp32"]
    u8 = next(r for r in records if r["id"] == "u8")
    assert f"0.020 ({u8['delta_pct']['dsc']:.1f}%)" in by_id["u8"]  # no per-case values: no interval
    assert by_id[""][:4] == ["swin_unetr", "btcv†", "FP32§", "-"] and "0.013 (-)" in by_id[""]  # from its baseline


def test_page_text(results, tmp_path):
    records = read_records(results)
    report = build_report(records, n_resamples=300)
    text = render_html(report, source=str(results))
    page = Page(text)
    check_headline(page, records)
    # per-class tables: the configs' columns carry their setting too
    per_class = next(t for t in page.tables if t[0][1][0] == "Class" and len(t[0][1]) == 4)  # unet's DSC table
    assert sorted(per_class[0][1]) == ["Class", "FP32", "INT W4A4 Per-channel/token [method.exclude=[]]",
                                       "INT W4A4 Per-channel/token [method.exclude=[conv1x1x1]]"]  # fmt: skip
    assert [cells[0] for _, cells in per_class[1:]] == [*CLASSES, "Mean"]
    # figures: embedded PNGs, nothing fetched from anywhere
    assert len(page.images) == 3  # DSC bars of the two groups with quantized rows, one per-class heat map
    for img in page.images:
        assert img["src"].startswith("data:image/png;base64,")
        assert base64.b64decode(img["src"].split(",", 1)[1])[:8] == PNG_MAGIC
    assert all(link.startswith("#") for link in page.links), page.links
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)
    assert "default-src 'none'" in text  # the Content-Security-Policy
    # failed config: listed, escaped, with the traceback folded away
    failures = page.table_with("Config")
    assert [cells[0] for _, cells in failures[1:]] == ["boom"]
    assert f"RuntimeError: {EVIL}" in failures[1][1][-1]  # the text as written ...
    assert EVIL not in text and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text  # ... never as markup
    # machines and versions: one line per distinct machine / versions / commit, with its record count
    hosts = [cells for _, cells in page.table_with("Host")[1:]]
    assert sorted(c[0] for c in hosts) == ["gpu-b", "gpu-b", "node-a"]  # the failure did not record its device
    node_a = next(c for c in hosts if c[0] == "node-a")
    gpu_b = next(c for c in hosts if c[0] == "gpu-b" and c[6] != "?")
    assert node_a[4] == "2.13.0+cpu" and node_a[-1] == "3" and node_a[7] == "0123456789ab"  # fp32, plain, u8
    assert gpu_b[4] == "2.13.0+cu126" and "type=cuda" in gpu_b[6] and gpu_b[7] == "0123456789ab (dirty)"
    assert sum(int(c[-1]) for c in hosts) == len(records)
    # configurations: each row's own settings, linked from the headline table
    assert f'id="{anchor("w4-keep-1x1")}"' in text and f'href="#{anchor("w4-keep-1x1")}"' in text
    assert "UNTRAINED" in text and "1 quantized config(s) evaluate a network without a checkpoint" in text
    # the writer and the CLI
    path = write_html(report, tmp_path / "out", source="x")
    assert path == tmp_path / "out" / HTML_FILE and path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert main([str(results), "--out", str(tmp_path / "cli"), "--formats", "md", "--html"]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == ["per_class_dsc.md", "per_class_nsd.md",
                                                                    "report.html", "table.md"]  # fmt: skip


def test_machines_tolerate_missing_fields():
    rows = machines([{"host": {"hostname": "h"}}, {"host": "not a dict"}, {}])
    assert rows[0][:3] == ("h", "?", "?") and rows[1][0] == "?" and rows[1][-1] == "2"


# -- rendered by a real browser ------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--hide-scrollbars", "--no-first-run", f"--user-data-dir={profile}", *args, url]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


@needs_chromium
def test_page_renders_in_headless_chromium(results, tmp_path):
    records = read_records(results)
    path = write_html(build_report(records, n_resamples=300), tmp_path / "report", source=str(results))
    # the DOM after loading: tables as rendered, and each image decoded by the browser (the page's script writes
    # naturalWidth / naturalHeight, 0 for an image the browser could not decode)
    dom = Page(chromium(tmp_path, path.as_uri(), "--dump-dom").stdout)
    check_headline(dom, records)
    assert len(dom.images) == 3 and dom.body.get("data-images-decoded") == "3/3"
    for img in dom.images:
        assert int(img["data-natural-width"]) > 200 and int(img["data-natural-height"]) > 200
    # the check can fail: a page whose first image is corrupt reports it
    text = path.read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(re.sub(r"base64,[A-Za-z0-9+/]{40}", "base64,AAAA" + "A" * 36, text, count=1), encoding="utf-8")
    bad = Page(chromium(tmp_path, broken.as_uri(), "--dump-dom").stdout)
    assert bad.body.get("data-images-decoded") == "2/3" and bad.images[0]["data-natural-width"] == "0"
    # a screenshot of the top of the page is not blank: dark text on a light page, a table's header shading
    shot = tmp_path / "shot.png"
    chromium(tmp_path, path.as_uri(), f"--screenshot={shot}", "--window-size=1280,1600")
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1280)
    gray = pixels.mean(axis=2)
    assert (gray < 0.3).mean() > 0.002  # text
    assert (gray > 0.9).mean() > 0.5  # mostly white page
    assert np.unique(pixels.reshape(-1, 3), axis=0).shape[0] > 50  # figures and anti-aliased text, not a flat fill
