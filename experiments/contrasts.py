"""Pairwise comparisons of one sampler against several others, corrected for their number: P(focus > other)
with Holm-Bonferroni-adjusted stratified-bootstrap intervals, and the separation rule issue 30 fixed in
advance (the corrected interval of P(focus > uniform) lies above 1/2)."""

from __future__ import annotations

import numpy as np
from rliable import library as rly
from rliable import metrics

from experiments.markdown import markdown_table
from experiments.stats import global_numpy_seed


def bootstrap_improvement(x: np.ndarray, y: np.ndarray, reps: int = 5000, seed: int = 0) -> np.ndarray:
    """``reps`` stratified-bootstrap replicates of ``P(X > Y)`` (rliable's ``probability_of_improvement``).

    Each replicate resamples the runs of ``x`` and of ``y`` (``[runs, tasks]``) with replacement,
    independently and within each task (``rliable.library.StratifiedIndependentBootstrap``), with the
    global numpy generator seeded by ``seed``: the very replicates whose 2.5 and 97.5 percentiles are
    :func:`experiments.stats.improvement_over`'s 95% interval.

    Examples:
        >>> x = np.array([[1.0], [2.0], [3.0]])
        >>> bootstrap_improvement(x + 10, x, reps=100).tolist() == [1.0] * 100
        True
    """
    with global_numpy_seed(seed):
        bootstrap = rly.StratifiedIndependentBootstrap(np.asarray(x, dtype=float), np.asarray(y, dtype=float))
        replicates = bootstrap.apply(lambda a, b: np.array([metrics.probability_of_improvement(a, b)]), reps)
    return replicates[:, 0]


def holm_improvement(
    scores: dict[str, np.ndarray],
    focus: str,
    others: list[str],
    reps: int = 5000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[dict]:
    """``P(focus > other)`` for each of the ``k = len(others)`` other samplers, with Holm-corrected intervals.

    For each comparison ``c`` (``X`` the focus's runs, ``Y`` the other's, ``[runs, tasks]`` scores):

    * the point: ``P_c = (1/M) sum_m (1/(N_x N_y)) sum_i sum_j S(x[i, m], y[j, m])``, ``S = 1`` if
      ``x > y``, ``1/2`` if equal, ``0`` else (rliable's probability of improvement);
    * its bootstrap replicates ``P*_c`` (:func:`bootstrap_improvement`, ``reps`` of them, ``seed``);
    * a two-sided bootstrap p-value of ``P_c = 1/2``:
      ``p_c = min(1, 2 min(mean(P*_c <= 1/2), mean(P*_c >= 1/2)))`` (a replicate at exactly 1/2 counts in
      both tails: conservative).

    Holm's step-down procedure (Holm, 1979) at family-wise level ``alpha``: order the comparisons by
    ``p_c``, smallest first (ties in the order of ``others``); the ``i``-th (``i = 1..k``) gets the
    confidence level ``1 - alpha / (k - i + 1)`` (98.33%, 97.5%, 95% for ``k = 3``, ``alpha = 0.05``)
    and its percentile interval at that level, ``[q(a/2), q(1 - a/2)]`` of ``P*_c`` with
    ``a = alpha / (k - i + 1)``. Going down the order, a comparison is *separated* when its interval
    leaves out 1/2 and every comparison before it was separated; the first that is not stops the
    procedure, and none after it is separated, whatever its interval. A separated comparison's interval
    lies wholly above 1/2 (the focus ahead) or below (the other ahead). These are Holm-adjusted levels, the
    decisions of Holm's test read off the intervals; as intervals they are not simultaneous (the
    Bonferroni level, ``1 - alpha / k`` for all, would be).

    Returns one dict per other sampler, in the order of ``others``: ``other``, ``p`` (``P_c``), ``lo``,
    ``hi`` (the corrected interval), ``level``, ``rank`` (1 = first in Holm's order), ``p_boot``
    (``p_c``), ``lo95``, ``hi95`` (the uncorrected 95% interval), ``separated`` and ``direction``
    (``"above"``, ``"below"`` or None: where the corrected interval lies relative to 1/2).

    Examples:
        >>> x = np.arange(10.0)[:, None]
        >>> scores = {"laber": x + 20, "uniform": x, "per": x + 1}
        >>> rows = holm_improvement(scores, "laber", ["uniform", "per"], reps=500)
        >>> [(r["other"], r["p"], r["rank"], round(r["level"], 3), r["separated"], r["direction"]) for r in rows]
        [('uniform', 1.0, 1, 0.975, True, 'above'), ('per', 1.0, 2, 0.95, True, 'above')]
    """
    if focus not in scores:
        raise ValueError(f"focus: {focus!r} has no scores (have {sorted(scores)})")
    missing = [o for o in others if o not in scores]
    if missing or focus in others or not others:
        raise ValueError(f"others: expected samplers with scores other than {focus!r}, got {others}")
    x = np.asarray(scores[focus], dtype=float)
    points, replicates = {}, {}
    for other in others:
        y = np.asarray(scores[other], dtype=float)
        points[other] = float(metrics.probability_of_improvement(x, y))
        replicates[other] = bootstrap_improvement(x, y, reps, seed)
    return holm_from_replicates(points, replicates, alpha)


def holm_from_replicates(
    points: dict[str, float], replicates: dict[str, np.ndarray], alpha: float = 0.05
) -> list[dict]:
    """Holm's step-down on bootstrap replicates: :func:`holm_improvement` once the replicates are drawn.

    ``points[c]`` is comparison ``c``'s estimate, ``replicates[c]`` its bootstrap replicates; the rows come
    back in the order of ``points`` (see :func:`holm_improvement` for the method and the keys).

    Examples:
        >>> reps = {"a": np.full(1000, 0.9), "b": np.r_[np.full(30, 0.3), np.full(970, 0.7)]}
        >>> rows = holm_from_replicates({"a": 0.9, "b": 0.7}, reps)
        >>> [(r["other"], r["rank"], r["p_boot"], r["separated"]) for r in rows]
        [('a', 1, 0.0, True), ('b', 2, 0.06, False)]
    """
    k = len(points)
    rows = []
    for other, point in points.items():
        r = np.asarray(replicates[other], dtype=float)
        p_boot = min(1.0, 2 * min(np.mean(r <= 0.5), np.mean(r >= 0.5)))
        lo95, hi95 = np.percentile(r, [2.5, 97.5])
        rows.append({"other": other, "p": point, "p_boot": float(p_boot), "lo95": float(lo95), "hi95": float(hi95)})
    order = sorted(range(k), key=lambda i: rows[i]["p_boot"])  # sorted() is stable: ties keep the given order
    going = True
    for rank, i in enumerate(order, start=1):
        row = rows[i]
        a = alpha / (k - rank + 1)
        low, high = np.percentile(np.asarray(replicates[row["other"]], dtype=float), [100 * a / 2, 100 * (1 - a / 2)])
        direction = "above" if low > 0.5 else "below" if high < 0.5 else None
        going = going and direction is not None  # step-down: the first comparison not separated stops it
        row.update(rank=rank, level=1 - a, lo=float(low), hi=float(high), direction=direction, separated=going)
    return rows


def separation(rows: list[dict], baseline: str = "uniform") -> str:
    """The verdict on ``P(focus > baseline)`` from :func:`holm_improvement`'s rows, in words.

    Separation (issue 30, fixed before the runs) means Holm's procedure separates the comparison and its
    corrected interval lies above 1/2; anything else is a null at this budget, reported with its interval.

    Examples:
        >>> separation([{"other": "uniform", "p": 0.8, "lo": 0.6, "hi": 0.95, "level": 0.9833,
        ...              "separated": True, "direction": "above"}])
        'separates from uniform: P = 0.80, its Holm-corrected 98.3% interval [0.60, 0.95] lies above 0.5'
        >>> separation([{"other": "uniform", "p": 0.6, "lo": 0.4, "hi": 0.8, "level": 0.975,
        ...              "separated": False, "direction": None}])
        'does not separate from uniform (a null at this budget): P = 0.60, Holm-corrected 97.5% interval [0.40, 0.80]'
    """
    (row,) = [r for r in rows if r["other"] == baseline]
    interval = f"{100 * row['level']:.1f}% interval [{row['lo']:.2f}, {row['hi']:.2f}]"
    if row["separated"] and row["direction"] == "above":
        return f"separates from {baseline}: P = {row['p']:.2f}, its Holm-corrected {interval} lies above 0.5"
    if row["separated"]:
        return f"ends below {baseline}: P = {row['p']:.2f}, its Holm-corrected {interval} lies below 0.5"
    why = "" if row["direction"] is None else "; Holm's step-down stopped before it"
    return (
        f"does not separate from {baseline} (a null at this budget): P = {row['p']:.2f}, Holm-corrected {interval}{why}"
    )


def contrast_table(rows: list[dict], focus: str) -> list[str]:
    """The markdown lines of :func:`holm_improvement`'s rows.

    Examples:
        >>> rows = [{"other": "uniform", "p": 0.8, "lo": 0.6, "hi": 0.95, "level": 0.9833, "rank": 1,
        ...          "p_boot": 0.004, "lo95": 0.65, "hi95": 0.93, "separated": True, "direction": "above"}]
        >>> contrast_table(rows, "laber-mean")[2]
        '| P(laber-mean > uniform) | 0.80 | 1 | 98.3% | [0.60, 0.95] | [0.65, 0.93] | 0.004 | yes, above 0.5 |'
    """
    header = ["comparison", "P", "Holm rank", "level", "corrected interval", "95% interval", "bootstrap p"]
    cells = [
        [
            f"P({focus} > {r['other']})",
            f"{r['p']:.2f}",
            str(r["rank"]),
            f"{100 * r['level']:.1f}%",
            f"[{r['lo']:.2f}, {r['hi']:.2f}]",
            f"[{r['lo95']:.2f}, {r['hi95']:.2f}]",
            f"{r['p_boot']:.3f}",
            f"yes, {r['direction']} 0.5" if r["separated"] else "no",
        ]
        for r in rows
    ]
    return markdown_table([*header, "separated"], cells)
