"""Accuracy the way cuffless-BP studies report it: MAE, RMSE, mean error +/- SD, cumulative error shares,
BHS grade, AAMI pass/fail, calibration-free and per-subject calibrated, hypertension-stage confusion, and
Bland-Altman / estimate-versus-reference plots.

Errors are estimate minus reference (mmHg). BHS grades (British Hypertension Society protocol) by cumulative
share of absolute errors within 5/10/15 mmHg: A >= 60/85/95 %, B >= 50/75/90 %, C >= 40/65/85 %, else D.
AAMI (ANSI/AAMI/ISO 81060-2): |mean error| <= 5 mmHg and SD <= 8 mmHg (the subject-count requirement of 85 is
reported through ``n`` and ``n_subjects``, not enforced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.anomaly import CATEGORIES, bp_category

BHS_THRESHOLDS = {"A": (0.60, 0.85, 0.95), "B": (0.50, 0.75, 0.90), "C": (0.40, 0.65, 0.85)}
STAGES = ("normal", "elevated", "stage1", "stage2")


def bhs_grade(w5: float, w10: float, w15: float) -> str:
    for grade, (a, b, c) in BHS_THRESHOLDS.items():
        if w5 >= a and w10 >= b and w15 >= c:
            return grade
    return "D"


def error_metrics(est: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """The per-pressure metric object of metrics.json (fractions for within_*; None values when n == 0)."""
    est, ref = np.asarray(est, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    err = est - ref
    n = int(err.size)
    if n == 0:
        return {"mae": None, "rmse": None, "me": None, "sd": None, "within_5": None, "within_10": None,
                "within_15": None, "bhs_grade": None, "aami_pass": None, "n": 0}
    ae = np.abs(err)
    me, sd = float(err.mean()), float(err.std(ddof=1)) if n > 1 else 0.0
    w5, w10, w15 = (float(np.mean(ae <= t)) for t in (5.0, 10.0, 15.0))
    return {"mae": float(ae.mean()), "rmse": float(np.sqrt(np.mean(err**2))), "me": me, "sd": sd,
            "within_5": w5, "within_10": w10, "within_15": w15, "bhs_grade": bhs_grade(w5, w10, w15),
            "aami_pass": bool(abs(me) <= 5.0 and sd <= 8.0), "n": n}


def calibrate(est: np.ndarray, ref: np.ndarray, subject: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                          np.ndarray]:
    """Per-subject one-point calibration: the subject's first window (by time) is the reference reading; its
    offset (reference - estimate) is added to the subject's later windows. Returns (calibrated estimates,
    references, mask of windows that remain, i.e. all but each subject's calibration window)."""
    est, ref = np.asarray(est, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    out = est.copy()
    keep = np.ones(est.size, dtype=bool)
    for s in np.unique(subject):
        idx = np.flatnonzero(subject == s)
        first = idx[np.argmin(t[idx])]
        out[idx] += ref[first] - est[first]
        keep[first] = False
    return out, ref, keep


def carried_forward(ref: np.ndarray, subject: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The calibration reading carried forward: every window 'estimated' as its subject's first reference."""
    out = np.empty(ref.size, dtype=np.float64)
    for s in np.unique(subject):
        idx = np.flatnonzero(subject == s)
        out[idx] = ref[idx[np.argmin(t[idx])]]
    return out


def paired_report(sbp_est: np.ndarray, dbp_est: np.ndarray, sbp_ref: np.ndarray, dbp_ref: np.ndarray,
                  subject: np.ndarray, t: np.ndarray) -> dict[str, Any]:
    """The metrics.json body: calibration_free and calibrated sections, n_subjects, n_windows."""
    cal_s, _, keep = calibrate(sbp_est, sbp_ref, subject, t)
    cal_d, _, _ = calibrate(dbp_est, dbp_ref, subject, t)
    return {
        "calibration_free": {"sbp": error_metrics(sbp_est, sbp_ref), "dbp": error_metrics(dbp_est, dbp_ref)},
        "calibrated": {"sbp": error_metrics(cal_s[keep], sbp_ref[keep]),
                       "dbp": error_metrics(cal_d[keep], dbp_ref[keep])},
        "n_subjects": len(set(np.asarray(subject).tolist())),
        "n_windows": int(np.asarray(sbp_est).size),
    }


def stage_confusion(sbp_est: np.ndarray, dbp_est: np.ndarray, sbp_ref: np.ndarray,
                    dbp_ref: np.ndarray) -> dict[str, Any]:
    """ACC/AHA stage confusion matrix (rows reference, columns estimate; crisis folded into stage2) and the
    sensitivity/specificity of detecting hypertension (stage 1 or worse)."""
    def stage(s: float, d: float) -> str:
        c = bp_category(s, d)
        return "stage2" if c == "crisis" else c

    ref = [stage(s, d) for s, d in zip(sbp_ref, dbp_ref, strict=True)]
    est = [stage(s, d) for s, d in zip(sbp_est, dbp_est, strict=True)]
    m = np.zeros((len(STAGES), len(STAGES)), dtype=int)
    for r, e in zip(ref, est, strict=True):
        m[STAGES.index(r), STAGES.index(e)] += 1
    hyp_r = np.array([r in ("stage1", "stage2") for r in ref])
    hyp_e = np.array([e in ("stage1", "stage2") for e in est])
    tp, tn = int((hyp_r & hyp_e).sum()), int((~hyp_r & ~hyp_e).sum())
    return {"labels": list(STAGES), "matrix": m.tolist(),
            "accuracy": float(np.trace(m) / m.sum()) if m.sum() else None,
            "hypertension_sensitivity": tp / int(hyp_r.sum()) if hyp_r.any() else None,
            "hypertension_specificity": tn / int((~hyp_r).sum()) if (~hyp_r).any() else None,
            "categories": list(CATEGORIES)}


def plot_pair(est: np.ndarray, ref: np.ndarray, title: str, path: Path) -> None:
    """Bland-Altman (difference vs mean, bias and 95 % limits) and estimate-vs-reference side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    est, ref = np.asarray(est, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    if est.size:
        diff, mean = est - ref, (est + ref) / 2
        bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if diff.size > 1 else 0.0
        ax1.scatter(mean, diff, s=4, alpha=0.4)
        for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            ax1.axhline(y, color="k", linestyle=style, linewidth=1)
        ax1.set_title(f"Bland-Altman: bias {bias:+.1f}, LoA +/-{1.96 * sd:.1f} mmHg")
        lo, hi = float(min(ref.min(), est.min())) - 5, float(max(ref.max(), est.max())) + 5
        ax2.scatter(ref, est, s=4, alpha=0.4)
        ax2.plot([lo, hi], [lo, hi], "k--", linewidth=1)
        ax2.set_xlim(lo, hi)
        ax2.set_ylim(lo, hi)
        ax2.set_title(f"estimate vs reference (MAE {np.abs(diff).mean():.1f} mmHg, n={est.size})")
    ax1.set_xlabel("mean of estimate and reference (mmHg)")
    ax1.set_ylabel("estimate - reference (mmHg)")
    ax2.set_xlabel("reference (mmHg)")
    ax2.set_ylabel("estimate (mmHg)")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
