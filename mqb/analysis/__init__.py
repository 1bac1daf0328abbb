"""Analyses of float and quantized models: activation statistics, reports and figures, and the uncertainty of
each config's change from its FP32 baseline (:mod:`mqb.analysis.stats`: paired per-case differences, bootstrap
confidence intervals, paired tests, Holm's correction)."""

__all__ = ["activation_stats", "figures", "html", "overlays", "report", "sensitivity", "stats", "tables"]
