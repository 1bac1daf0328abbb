"""``python -m mqb.report``: paper-style tables (Markdown, LaTeX, CSV) and figures from a results directory.

    python -m mqb.report outputs/results                                 # report/table.{md,tex,csv}
    python -m mqb.report /shared/mqb/results --out paper --formats md,tex --figures
    python -m mqb.report outputs/results --html                          # + report/report.html, self-contained

Rows: one per config, the latest success record per config id (error records and other record kinds are
listed under the Markdown table, not in it), grouped per model, dataset and FP32 baseline (untrained networks
and other checkpoints get their own group, marked † and (2)) with the FP32 row first, then W8A8, W4A8, W4A4 and
other precisions; cells read ``DSC (↓Δ%)`` / ``NSD (↓Δ%)`` as in MedQuanBench Tables 1-3.
``--figures`` adds, per model and dataset, ``dsc_<model>_<dataset>.png`` (DSC bars by precision x granularity,
FP32 dashed) and ``per_class_delta_dsc_<model>_<dataset>.png`` (per-class DSC drop heat map).
Records with a ``predictions`` section (``eval.save_predictions=true``) add, with ``--figures`` or ``--html``,
Fig. 4 per model and dataset: ``overlay_<model>_<dataset>.png`` (image, label, FP32 and each quantized config's
prediction on the axial slices where they disagree most) and ``overlays.md`` (captions, warnings); a missing or
unreadable NIfTI file is named in a warning on stderr and the report still renders (:mod:`mqb.analysis.overlays`).
``--overlay-cases K``: overlays of the first K cases (sorted) per model and dataset (default 1, 0: none).
``--html`` adds ``report.html``: one page that opens from disk (no server, no network; figures embedded) with the
tables, the figures, each row's distinguishing settings, untrained flags, failed configs and the machines and
versions the records came from (:mod:`mqb.analysis.html`).

Every record file is checked against the record schema (:func:`mqb.results.validate_record`): a corrupt one
(truncated, not UTF-8, not a record, a success without metrics) is named on stderr and left out.
Exits 2 when the directory does not exist or holds no success record.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mqb.analysis.report import build_report, render, write_report
from mqb.analysis.tables import FORMATS
from mqb.results import read_records


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(f.strip() for f in text.split(",") if f.strip()))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"unknown format(s) {','.join(unknown) or repr(text)}; choose from "
                                         f"{','.join(FORMATS)}")  # fmt: skip
    return formats


def main(argv: list[str] | None = None) -> int:
    doc = __doc__ or ""
    summary, _, details = doc.partition("\n\n")
    parser = argparse.ArgumentParser(prog="python -m mqb.report", description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "results_dir", type=Path, help="the results_dir of mqb.eval: <id>.json / <id>.error.json records"
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: ./report)")
    parser.add_argument("--formats", type=_formats, default=tuple(FORMATS),
                        help=f"comma-separated subset of {','.join(FORMATS)} (default: all)")  # fmt: skip
    parser.add_argument("--figures", action="store_true", help="also write PNG figures per model and dataset")
    html_help = "also write report.html: tables, figures, configs, failures and machines in one file"
    parser.add_argument("--html", action="store_true", help=html_help)
    parser.add_argument("--overlay-cases", type=int, default=1, metavar="K",
                        help="overlay figures (Fig. 4, from saved predictions) of the first K cases per model and "
                             "dataset (default 1; 0: none)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.overlay_cases < 0:
        parser.error(f"--overlay-cases must be >= 0; got {args.overlay_cases}")
    if not args.results_dir.is_dir():
        print(f"mqb.report: results directory {str(args.results_dir)!r} does not exist", file=sys.stderr)
        return 2
    report = build_report(read_records(args.results_dir))
    if not report.selection.successes:
        print(f"mqb.report: no success records in {str(args.results_dir)!r} "
              f"({len(report.selection.errors)} failed config(s))", file=sys.stderr)  # fmt: skip
        return 2
    paths = write_report(report, args.out, args.formats, with_figures=args.figures)
    overlays = None
    saved = [r for r in report.selection.successes if r.get("predictions") is not None]
    if saved and (args.figures or args.html):
        from mqb.analysis.overlays import overlay_figures, write_overlays

        overlays = overlay_figures(report, max_cases=args.overlay_cases)
        for warning in overlays.warnings:
            print(f"mqb.report: warning: {warning}", file=sys.stderr)
        if args.figures:
            paths += write_overlays(overlays, args.out, markdown="md" in args.formats)
    elif saved:
        print(f"mqb.report: {len(saved)} record(s) have saved predictions: --figures or --html draws their overlays "
              "(Fig. 4)", file=sys.stderr)  # fmt: skip
    if args.html:
        from mqb.analysis.html import write_html

        paths.append(write_html(report, args.out, source=str(args.results_dir),
                                extra_images=overlays.figures if overlays else None,
                                captions=overlays.captions if overlays else None,
                                warnings=overlays.warnings if overlays else ()))  # fmt: skip
    print(render(report, "md"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
