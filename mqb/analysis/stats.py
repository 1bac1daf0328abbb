"""Uncertainty of a quantized config's change from its FP32 baseline: paired per-case differences, bootstrap
confidence intervals, paired tests and Holm's correction across the configs of a sweep.

The unit of replication is the **test case** (one volume). For a metric ``m`` (DSC, NSD) and a class ``c``, case
``i`` gives a paired difference ``d_i = m_quant(i, c) - m_fp32(i, c)`` (negative: the quantized network is worse).
Pairs where either side is excluded (NaN / ``None``: the structure is absent from reference and prediction, see
``mqb.metrics``) are dropped and counted. The *mean over classes* of a case is the mean over the classes that
are valid on both sides, so ``d_i = mean_c m_quant(i, c) - mean_c m_fp32(i, c)`` over the same classes; without
excluded values its mean over cases equals the record's ``mDSC_quant - mDSC_fp32``.

Per difference vector ``d_1 .. d_n`` (:func:`compare` does this for every metric, class and the class mean):

* point estimate ``Δ = mean(d)``; relative drop ``drop_pct = -100 Δ / mean(m_fp32)`` over the same cases
  (the sign convention of the records' ``delta_pct`` and of the paper's ↓Δ%: positive = worse than FP32; the FP32
  mean is treated as fixed when the interval of ``Δ`` is carried over to ``drop_pct``);
* a bootstrap confidence interval of ``Δ`` over cases (:func:`bootstrap_ci`): resample the ``n`` cases with
  replacement ``B`` times and take quantiles of the resampled means, either the percentile interval
  ``[θ*_(α/2), θ*_(1-α/2)]`` or the bias-corrected and accelerated (BCa) interval, whose quantile levels
  ``α_1,2 = Φ(z0 + (z0 + z_α) / (1 - a (z0 + z_α)))`` correct for the bootstrap distribution's bias
  ``z0 = Φ⁻¹(#{θ* < θ̂} / B)`` and skew (acceleration ``a`` from the jackknife). Efron & Tibshirani (1993),
  *An Introduction to the Bootstrap*, ch. 13-14. The computation is ``scipy.stats.bootstrap``'s;
* a paired test of ``H0: the differences are symmetric about 0`` (:func:`paired_test`): with few cases the exact
  sign-flip permutation test (Fisher 1935; Good 2005, *Permutation, Parametric and Bootstrap Tests of
  Hypotheses*, ch. 3): under H0 each ``d_i`` is as likely to be ``-d_i``, so the two-sided p-value is the share of
  the ``2^n`` sign vectors ``s`` with ``|Σ s_i d_i| ≥ |Σ d_i|`` (all enumerated for ``n ≤ 16``, else a seeded
  Monte-Carlo sample of ``R`` sign vectors with ``p = (1 + #hits) / (1 + R)``, Phipson & Smyth 2010); with more
  cases the Wilcoxon signed-rank test (Wilcoxon 1945, ``scipy.stats.wilcoxon``; zero differences dropped);
* Holm's step-down correction across the configs of a sweep (:func:`holm`, :func:`apply_holm`; Holm 1979,
  *A simple sequentially rejective multiple test procedure*, Scand. J. Statist. 6:65-70): with the ``m`` p-values
  sorted ``p_(1) ≤ … ≤ p_(m)``, ``p̃_(i) = max_{j ≤ i} min(1, (m - j + 1) p_(j))``; a config is significant when
  ``p̃ < α``. This controls the family-wise error rate over the configs (one family per metric and class).

With ``n`` cases the exact test cannot give ``p < 2 / 2^n`` (two-sided): with 4 or 5 test cases no change is
significant at 0.05, whatever its size; :func:`paired_test` reports this floor as ``min_p``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Largest number of cases whose ``2^n`` sign flips :func:`permutation_test` enumerates (65 536 flips).
MAX_EXACT = 16
#: ``paired_test(method="auto")`` uses the exact permutation test up to this many cases, Wilcoxon above.
AUTO_PERMUTATION_MAX = 12
#: Below this many cases bootstrap intervals cover less than their nominal level (they treat the few cases as
#: the population; Efron & Tibshirani 1993): :func:`compare_values` says so in ``ci_reason``.
FEW_CASES = 10
METHODS = ("BCa", "percentile")
TESTS = ("auto", "permutation", "wilcoxon")
SIGN_CONVENTION = (
    "delta = quantized - FP32 (mean over cases of the paired per-case differences; negative: worse than FP32); "
    "drop_pct = -100 * delta / FP32 mean over the same cases (as the records' delta_pct: positive = worse); "
    "ci_low/ci_high bound delta, drop_pct_ci_low/high bound drop_pct"
)


def _finite(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.floating | np.integer)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _json_float(value: Any) -> float | None:
    """``None`` for NaN / inf / ``None`` (JSON has no NaN), else a plain ``float``."""
    return float(value) if value is not None and _finite(value) else None


# -- pairing ----------------------------------------------------------------------------------------------
@dataclass
class Paired:
    """Paired per-case values: ``diffs = quant - fp32`` for ``cases`` (sorted case ids); ``dropped`` lists the
    case ids present on both sides whose pair held an excluded value, ``unmatched`` those on one side only."""

    cases: list[str]
    fp32: np.ndarray
    quant: np.ndarray
    dropped: list[str]
    unmatched: list[str]

    @property
    def diffs(self) -> np.ndarray:
        return self.quant - self.fp32


def pair_values(fp32_cases: Mapping[str, Any], quant_cases: Mapping[str, Any]) -> Paired:
    """Match two ``{case id: value}`` dicts by case id; a pair with a ``None`` / NaN side is dropped."""
    common = sorted(set(fp32_cases) & set(quant_cases))
    unmatched = sorted(set(fp32_cases) ^ set(quant_cases))
    cases, f, q, dropped = [], [], [], []
    for case in common:
        a, b = fp32_cases[case], quant_cases[case]
        if _finite(a) and _finite(b):
            cases.append(case)
            f.append(float(a))
            q.append(float(b))
        else:
            dropped.append(case)
    return Paired(cases, np.asarray(f, dtype=float), np.asarray(q, dtype=float), dropped, unmatched)


def paired_differences(
    fp32_cases: Mapping[str, Any], quant_cases: Mapping[str, Any]
) -> tuple[list[str], np.ndarray, int]:
    """``(cases, diffs, dropped)``: the case ids present on both sides with finite values (sorted), their
    differences ``quant - fp32``, and how many pairs were dropped (a NaN / ``None`` side, i.e. a structure absent
    from reference and prediction, or a case missing on one side)."""
    p = pair_values(fp32_cases, quant_cases)
    return p.cases, p.diffs, len(p.dropped) + len(p.unmatched)


# -- confidence interval ----------------------------------------------------------------------------------
@dataclass
class Interval:
    """A bootstrap confidence interval of the mean of ``n`` differences. ``method`` is the one that produced
    ``low``/``high`` (``"point"`` when no interval could be computed; ``reason`` says why)."""

    estimate: float | None
    low: float | None
    high: float | None
    confidence: float
    method: str
    n: int
    n_resamples: int
    seed: int | None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_ci(
    diffs: Sequence[float] | np.ndarray,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int | None = 0,
    method: str = "BCa",
) -> Interval:
    """Bootstrap confidence interval of ``mean(diffs)`` over cases, computed by ``scipy.stats.bootstrap``
    (``method``: ``"BCa"`` or ``"percentile"``; resampling with ``numpy.random.default_rng(seed)``, so the same
    seed gives the same interval). Efron & Tibshirani (1993), ch. 13 (percentile) and 14 (BCa).

    Degenerate inputs do not raise: no case -> ``estimate``/``low``/``high`` ``None``; one case, or all
    differences equal (zero variance: the jackknife acceleration of BCa is 0/0) -> the point itself as a
    zero-width interval; a BCa interval that is still undefined (e.g. very few distinct values) -> the
    percentile interval. ``method`` and ``reason`` say what happened."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {', '.join(METHODS)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return Interval(None, None, None, confidence, "point", 0, 0, seed, "no paired case")
    estimate = float(d.mean())
    if n < 2:
        return Interval(estimate, estimate, estimate, confidence, "point", n, 0, seed,
                        "one case: no interval")  # fmt: skip
    if np.ptp(d) == 0:
        return Interval(estimate, estimate, estimate, confidence, "point", n, 0, seed,
                        "all differences equal (zero variance)")  # fmt: skip
    reason = None
    used = method
    for attempt in (method, "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DegenerateDataWarning / 0-division inside BCa: checked below
            from scipy import stats as _scipy_stats  # imported when needed: readers of records stay quick

            res = _scipy_stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                                         method=attempt, rng=np.random.default_rng(seed))  # fmt: skip
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        used = attempt
        if math.isfinite(low) and math.isfinite(high):
            break
        reason = f"{attempt} interval undefined (degenerate bootstrap distribution)"
    else:
        return Interval(estimate, estimate, estimate, confidence, "point", n, n_resamples, seed, reason)
    if used != method:
        reason = f"{reason}; percentile interval instead"
    return Interval(estimate, low, high, confidence, used, n, n_resamples, seed, reason)


# -- paired test ------------------------------------------------------------------------------------------
@dataclass
class TestResult:
    """A paired test of ``H0: the differences are symmetric about 0``. ``method``: ``permutation-exact``,
    ``permutation-mc`` (Monte-Carlo), ``wilcoxon`` or ``none`` (``reason``); ``min_p``: the smallest p-value the
    test can give with these cases (exact permutation: ``2 / 2^n`` two-sided)."""

    pvalue: float | None
    statistic: float | None
    method: str
    n: int
    alternative: str
    min_p: float | None = None
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sign_matrix(n: int) -> np.ndarray:
    """All ``2^n`` sign vectors (rows) of length ``n``; the first row is all +1."""
    bits = (np.arange(2**n, dtype=np.int64)[:, None] >> np.arange(n, dtype=np.int64)) & 1
    return 1.0 - 2.0 * bits


def _tail(null: np.ndarray, observed: float, alternative: str, scale: float) -> np.ndarray:
    """Hits of the null statistics at least as extreme as ``observed`` (with a tolerance for rounding)."""
    eps = 1e-9 * max(scale, 1e-300)
    if alternative == "two-sided":
        return np.abs(null) >= abs(observed) - eps
    if alternative == "less":
        return null <= observed + eps
    return null >= observed - eps


def permutation_test(
    diffs: Sequence[float] | np.ndarray,
    alternative: str = "two-sided",
    n_resamples: int = 10_000,
    seed: int | None = 0,
    max_exact: int = MAX_EXACT,
) -> TestResult:
    """Sign-flip permutation test of the paired differences, statistic ``T = Σ d_i`` (equivalent to the mean).
    ``n ≤ max_exact``: exact, ``p = #{s ∈ {±1}^n : |Σ s_i d_i| ≥ |Σ d_i|} / 2^n`` (two-sided; ``less``/``greater``:
    one tail). Larger ``n``: ``n_resamples`` random sign vectors from ``default_rng(seed)``,
    ``p = (1 + hits) / (1 + n_resamples)``."""
    if alternative not in ("two-sided", "less", "greater"):
        raise ValueError(f"alternative={alternative!r}")
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return TestResult(None, None, "none", 0, alternative, None, "no paired case")
    observed = float(d.sum())
    scale = float(np.abs(d).sum())
    if n <= max_exact:
        null = _sign_matrix(n) @ d
        hits = int(_tail(null, observed, alternative, scale).sum())
        floor = (2.0 if alternative == "two-sided" else 1.0) / 2**n
        return TestResult(min(1.0, hits / 2**n), observed, "permutation-exact", n, alternative, min(1.0, floor))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, n_resamples, 2048):  # in blocks: bounded memory for many cases
        size = min(2048, n_resamples - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(size, n))
        hits += int(_tail(signs @ d, observed, alternative, scale).sum())
    return TestResult((1 + hits) / (1 + n_resamples), observed, "permutation-mc", n, alternative,
                      1 / (1 + n_resamples))  # fmt: skip


def wilcoxon_test(diffs: Sequence[float] | np.ndarray, alternative: str = "two-sided") -> TestResult:
    """Wilcoxon signed-rank test of the differences (``scipy.stats.wilcoxon``, zero differences dropped as in
    Wilcoxon's original test; exact null distribution for small ``n`` without ties, normal approximation else).
    All differences zero -> ``p = 1`` (no evidence of a change)."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    n = int(d.size)
    if n == 0:
        return TestResult(None, None, "none", 0, alternative, None, "no paired case")
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        return TestResult(1.0, 0.0, "wilcoxon", n, alternative, None, "all differences zero")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sample size too small for normal approximation" and friends
        from scipy import stats as _scipy_stats

        res = _scipy_stats.wilcoxon(d, alternative=alternative)
    floor = (2.0 if alternative == "two-sided" else 1.0) / 2**nonzero
    reason = None if nonzero == n else f"{n - nonzero} zero difference(s) dropped"
    return TestResult(_json_float(res.pvalue), _json_float(res.statistic), "wilcoxon", n, alternative,
                      min(1.0, floor), reason)  # fmt: skip


def paired_test(
    diffs: Sequence[float] | np.ndarray,
    method: str = "auto",
    alternative: str = "two-sided",
    n_resamples: int = 10_000,
    seed: int | None = 0,
) -> TestResult:
    """Paired test across cases: ``method="permutation"`` (:func:`permutation_test`: exact for ``n ≤ 16``,
    else seeded Monte-Carlo), ``"wilcoxon"`` (:func:`wilcoxon_test`), or ``"auto"``: the exact permutation test
    for ``n ≤ AUTO_PERMUTATION_MAX`` (12) cases, Wilcoxon above. Returns p-value, statistic and method name."""
    if method not in TESTS:
        raise ValueError(f"method={method!r}; expected one of {', '.join(TESTS)}")
    n = int(np.isfinite(np.asarray(diffs, dtype=float)).sum())
    if method == "permutation" or (method == "auto" and n <= AUTO_PERMUTATION_MAX):
        return permutation_test(diffs, alternative, n_resamples, seed)
    return wilcoxon_test(diffs, alternative)


# -- multiple comparisons ---------------------------------------------------------------------------------
def holm(pvalues: Mapping[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values (Holm 1979): sort the ``m`` p-values ascending,
    ``p̃_(i) = max_{j ≤ i} min(1, (m - j + 1) p_(j))``. A ``None`` / NaN p-value is not part of the family (``m``
    counts the others) and stays ``None``. Reject ``H_i`` at family-wise level ``α`` when ``p̃_i < α``."""
    valid = sorted(((float(p), k) for k, p in pvalues.items() if p is not None and _finite(p)), key=lambda t: t[0])
    m = len(valid)
    adjusted: dict[str, float | None] = {k: None for k in pvalues}
    running = 0.0
    for j, (p, key) in enumerate(valid):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[key] = running
    return adjusted


# -- one config vs its baseline ---------------------------------------------------------------------------
def _class_means(results: Mapping[str, Any], metric: str, width: int) -> list[float | None]:
    """Per index of the per-case lists, the mean over cases of the non-excluded values (as ``mqb.metrics``)."""
    sums, counts = [0.0] * width, [0] * width
    for values in (results.get("per_case") or {}).values():
        for i, v in enumerate(((values or {}).get(metric) or [])[:width]):
            if _finite(v):
                sums[i] += float(v)
                counts[i] += 1
    return [sums[i] / counts[i] if counts[i] else None for i in range(width)]


def _same(a: Any, b: Any) -> bool:
    if not _finite(a) or not _finite(b):
        return not _finite(a) and not _finite(b)
    return math.isclose(float(a), float(b), rel_tol=1e-7, abs_tol=1e-9)


def class_names(results: Mapping[str, Any], names: Sequence[str] | None = None) -> list[str]:
    """The foreground class of each position of the per-case lists of a results dict.

    ``per_case[case][metric]`` is a list in the dataset's class order, but a record read back from JSON (written
    with ``sort_keys``) has its ``per_class`` keys sorted by name, so their order is not trusted blindly: ``names``
    when given (e.g. ``config.dataset.class_names[1:]``); else the ``per_class`` key order when each class's mean
    matches the mean of its position (all metrics); else the order that this matching determines. Classes whose
    means are equal are told apart only when their per-case values are identical too (then either order is
    right); otherwise ``ValueError``: it never pairs a value with the wrong class."""
    per_case = results.get("per_case") or {}
    per_class = results.get("per_class") or {}
    width = max((len((v or {}).get(m) or []) for v in per_case.values() for m in ("dsc", "nsd")), default=0)
    if names is not None:
        names = [str(n) for n in names]
        if per_case and len(names) != width:
            raise ValueError(f"{len(names)} class names for per-case lists of {width} values")
        return names
    keys = list(per_class)
    if not per_case:
        return keys
    if not keys:
        return [f"class_{i + 1}" for i in range(width)]
    if len(keys) != width:
        raise ValueError(f"per_class has {len(keys)} classes but the per-case lists {width} values; pass class_names")
    metrics = [m for m in ("dsc", "nsd", "hd95") if any(m in (per_class[k] or {}) for k in keys)]
    means = {m: _class_means(results, m, width) for m in metrics}

    def fits(key: str, i: int) -> bool:
        return all(_same((per_class[key] or {}).get(m), means[m][i]) for m in metrics)

    def same_position(i: int, j: int) -> bool:  # interchangeable: equal values in every case and metric
        return all(
            _same(((v or {}).get(m) or [None] * width)[i], ((v or {}).get(m) or [None] * width)[j])
            for v in per_case.values()
            for m in metrics
        )

    unknown = "cannot tell which class each per-case value belongs to ({}); pass class_names"
    candidates = [[k for k in keys if fits(k, i)] for i in range(width)]
    if not all(candidates):
        raise ValueError(unknown.format("a position matches no class mean"))
    for i in range(width):
        for j in range(i + 1, width):
            if set(candidates[i]) & set(candidates[j]) and not same_position(i, j):
                raise ValueError(
                    unknown.format(f"classes {sorted(set(candidates[i]) & set(candidates[j]))} have equal means")
                )
    if all(fits(k, i) for i, k in enumerate(keys)):
        return keys
    order: list[str] = []
    for i in range(width):
        free = [k for k in candidates[i] if k not in order]
        if not free:
            raise ValueError(unknown.format("no consistent assignment"))
        order.append(free[0])
    return order


def per_case_values(results: Mapping[str, Any], metric: str, names: Sequence[str] | None = None) -> dict[str, dict]:
    """``{class: {case: value}}`` from a results dict (``SegmentationEvaluator.results``: ``per_case[case][metric]``
    is a list over foreground classes, ``None`` where excluded); ``names``: the classes of the list positions
    (:func:`class_names` when not given)."""
    names = list(names) if names is not None else class_names(results)
    out: dict[str, dict[str, Any]] = {c: {} for c in names}
    for case, values in (results.get("per_case") or {}).items():
        row = (values or {}).get(metric) or []
        for i, c in enumerate(names):
            out[c][case] = row[i] if i < len(row) else None
    return out


def _case_means(fp32: dict[str, dict], quant: dict[str, dict], names: Sequence[str]) -> tuple[dict, dict]:
    """Per case, the mean over the classes valid on both sides (``None`` when there is none)."""
    f_mean, q_mean = {}, {}
    for case in set().union(*(fp32[c] for c in names)) & set().union(*(quant[c] for c in names)):
        pairs = [(fp32[c].get(case), quant[c].get(case)) for c in names]
        pairs = [(float(a), float(b)) for a, b in pairs if _finite(a) and _finite(b)]
        f_mean[case] = float(np.mean([a for a, _ in pairs])) if pairs else None
        q_mean[case] = float(np.mean([b for _, b in pairs])) if pairs else None
    return f_mean, q_mean


def compare_values(
    fp32_cases: Mapping[str, Any],
    quant_cases: Mapping[str, Any],
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int | None = 0,
    ci_method: str = "BCa",
    test: str = "auto",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """One JSON-able entry of :func:`compare` for two ``{case: value}`` dicts: ``n``, ``dropped``, ``fp32``,
    ``quant`` (means over the paired cases), ``delta`` with ``ci_low``/``ci_high``, ``drop_pct`` with
    ``drop_pct_ci_low``/``drop_pct_ci_high``, ``ci_method`` (and ``ci_reason``), ``p``, ``test``, ``statistic``,
    ``min_p`` (and ``test_reason``), ``significant`` (``p < alpha``, uncorrected until :func:`apply_holm`) and
    ``p_holm`` (``None`` until then)."""
    paired = pair_values(fp32_cases, quant_cases)
    d = paired.diffs
    ci = bootstrap_ci(d, confidence, n_resamples, seed, ci_method)
    t = paired_test(d, test, n_resamples=n_resamples, seed=seed)
    f_mean = float(paired.fp32.mean()) if paired.cases else None

    def pct(value: float | None) -> float | None:
        return None if value is None or not f_mean else -100.0 * value / f_mean

    entry = {
        "n": len(paired.cases),
        "dropped": len(paired.dropped) + len(paired.unmatched),
        "fp32": _json_float(f_mean),
        "quant": _json_float(paired.quant.mean()) if paired.cases else None,
        "delta": _json_float(ci.estimate),
        "ci_low": _json_float(ci.low),
        "ci_high": _json_float(ci.high),
        "drop_pct": _json_float(pct(ci.estimate)),
        "drop_pct_ci_low": _json_float(pct(ci.high)),  # the sign flips: the upper Δ bound is the smallest drop
        "drop_pct_ci_high": _json_float(pct(ci.low)),
        "ci_method": ci.method,
        "p": t.pvalue,
        "test": t.method,
        "statistic": t.statistic,
        "min_p": t.min_p,
        "significant": None if t.pvalue is None else bool(t.pvalue < alpha),
        "p_holm": None,
    }
    if ci.reason:
        entry["ci_reason"] = ci.reason
    elif 2 <= len(paired.cases) < FEW_CASES:
        entry["ci_reason"] = f"only {len(paired.cases)} cases: bootstrap intervals are too narrow, rely on the test"
    if t.reason:
        entry["test_reason"] = t.reason
    return entry


def compare(
    fp32_results: Mapping[str, Any],
    quant_results: Mapping[str, Any],
    metrics: Iterable[str] = ("dsc", "nsd"),
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int | None = 0,
    ci_method: str = "BCa",
    test: str = "auto",
    alpha: float = 0.05,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``stats`` section of a quantized record: its results vs the FP32 baseline's, both structured as
    ``SegmentationEvaluator.results`` (``per_case[case][metric]``: list over foreground classes; ``per_class``:
    the class names). Per metric: ``{"mean": entry, "per_class": {class: entry}}`` with the entries of
    :func:`compare_values` (``mean``: the per-case mean over the classes valid on both sides); plus the settings
    (``confidence``, ``ci_method``, ``n_resamples``, ``seed``, ``test``, ``alpha``, ``holm: False`` until
    :func:`apply_holm`) and ``sign``, the sign convention. Classes missing on one side are skipped.

    ``class_names``: the foreground classes in the order of the per-case lists (the dataset's
    ``class_names[1:]``). Pass it when a side was read back from JSON (a cached baseline, a record): their
    ``per_class`` keys are sorted by name; without it the order is checked / recovered from the class means
    (:func:`class_names`), and a ``ValueError`` says when that is impossible."""
    metrics = tuple(metrics)
    names_q = _class_names(quant_results, class_names)
    names_f = _class_names(fp32_results, class_names)
    names = [c for c in names_q if c in names_f]
    options = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed, "ci_method": ci_method,
               "test": test, "alpha": alpha}  # fmt: skip
    out: dict[str, Any] = {**options, "holm": False, "sign": SIGN_CONVENTION, "metrics": list(metrics)}
    for metric in metrics:
        fp32 = per_case_values(fp32_results, metric, names_f)
        quant = per_case_values(quant_results, metric, names_q)
        f_mean, q_mean = _case_means(fp32, quant, names)
        out[metric] = {
            "mean": compare_values(f_mean, q_mean, **options),
            "per_class": {c: compare_values(fp32[c], quant[c], **options) for c in names},
        }
    return out


_class_names = class_names  # compare's parameter of the same name shadows the function


def _entries(stats: Mapping[str, Any]) -> Iterable[tuple[tuple[str, str], dict[str, Any]]]:
    for metric in stats.get("metrics") or ():
        block = stats.get(metric) or {}
        if "mean" in block:
            yield (metric, "mean"), block["mean"]
        for c, entry in (block.get("per_class") or {}).items():
            yield (metric, c), entry


def apply_holm(stats_by_config: Mapping[str, dict[str, Any]], alpha: float | None = None) -> dict[str, dict]:
    """Holm's correction across the configs of a sweep, in place: for every (metric, class or ``mean``) the
    p-values of all configs form one family; each entry gets ``p_holm`` and ``significant = p_holm < alpha``
    (``alpha``: each section's own unless given), and each section ``holm: True`` and ``holm_family_size``.
    Returns ``stats_by_config``."""
    families: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for config, stats in stats_by_config.items():
        for key, entry in _entries(stats):
            families.setdefault(key, {})[config] = entry
    for family in families.values():
        adjusted = holm({config: entry.get("p") for config, entry in family.items()})
        for config, entry in family.items():
            a = alpha if alpha is not None else stats_by_config[config].get("alpha", 0.05)
            entry["p_holm"] = adjusted[config]
            entry["significant"] = None if adjusted[config] is None else bool(adjusted[config] < a)
    for stats in stats_by_config.values():
        stats["holm"] = True
        stats["holm_family_size"] = len(stats_by_config)
    return dict(stats_by_config)


# -- calibration draws ------------------------------------------------------------------------------------
def calibration_spread(values_per_draw: Sequence[float | None] | Mapping[Any, float | None]) -> dict[str, Any]:
    """Spread of one metric over ``K`` calibration draws (e.g. mDSC per calibration seed): ``n_draws`` (finite
    values), ``mean``, ``std`` (sample standard deviation, ``ddof=1``; ``None`` for one draw), ``min``, ``max``,
    ``range`` and ``skipped`` (``None`` / NaN values left out). Accepts a list or a ``{draw: value}`` dict."""
    values = list(values_per_draw.values()) if isinstance(values_per_draw, Mapping) else list(values_per_draw)
    finite = np.asarray([float(v) for v in values if v is not None and _finite(v)], dtype=float)
    n = int(finite.size)
    return {
        "n_draws": n,
        "mean": _json_float(finite.mean()) if n else None,
        "std": _json_float(finite.std(ddof=1)) if n > 1 else None,
        "min": _json_float(finite.min()) if n else None,
        "max": _json_float(finite.max()) if n else None,
        "range": _json_float(np.ptp(finite)) if n else None,
        "skipped": len(values) - n,
    }


def with_holm(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``records`` whose ``stats`` carry Holm-adjusted p-values across these configs (one family per
    metric and class; :func:`apply_holm`), ``significant`` judged on them. Only the ``stats`` sections are copied
    (and changed): per-case metrics and configs are shared, not duplicated."""
    import copy

    out = [{**r, "stats": copy.deepcopy(r["stats"])} if isinstance(r.get("stats"), dict) else r for r in records]
    with_stats = {str(i): r["stats"] for i, r in enumerate(out) if isinstance(r.get("stats"), dict)}
    if with_stats:
        apply_holm(with_stats)
    return out
