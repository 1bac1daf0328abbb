"""Analyses of float and quantized models: activation statistics, reports and figures."""
