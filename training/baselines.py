"""Baselines evaluated on the same windows and subject-independent splits as the model.

* population mean: the training population's mean pressure for everyone (calibration-free);
* calibration reading carried forward: each subject's first reference, unchanged (calibrated);
* pulse-arrival-time regression: the classic physiological model, SBP/DBP = a + b / PAT + c * HR, fitted on
  training subjects only (subject-grouped k-fold), windows without a PAT get the training mean;
* CNN without LSTM: the same residual network with global pooling instead of the LSTM (trained by
  ``bpstream train`` on the same training data, stored in ``weights.pt``).
"""

from __future__ import annotations

import numpy as np

from bpstream.training.data import WindowSet
from bpstream.training.splits import assert_disjoint, group_kfold


def _pat_features(ws: WindowSet) -> tuple[np.ndarray, np.ndarray]:
    pat = ws.pat.astype(np.float64)
    hr = ws.hr.astype(np.float64)
    ok = np.isfinite(pat) & (pat > 0.05) & np.isfinite(hr)
    feats = np.stack([np.ones(len(ws)), 1.0 / np.where(ok, pat, 1.0), np.where(ok, hr, 0.0)], axis=1)
    return feats, ok


def fit_pat(train: WindowSet) -> tuple[np.ndarray | None, np.ndarray | None, float, float]:
    """Least-squares coefficients for SBP and DBP on [1, 1/PAT, HR] (None when too few windows have a PAT)."""
    feats, ok = _pat_features(train)
    mean_s, mean_d = float(train.sbp.mean()), float(train.dbp.mean())
    if ok.sum() < 10:
        return None, None, mean_s, mean_d
    coef_s = np.linalg.lstsq(feats[ok], train.sbp[ok].astype(np.float64), rcond=None)[0]
    coef_d = np.linalg.lstsq(feats[ok], train.dbp[ok].astype(np.float64), rcond=None)[0]
    return coef_s, coef_d, mean_s, mean_d


def predict_pat(model: tuple[np.ndarray | None, np.ndarray | None, float, float],
                ws: WindowSet) -> tuple[np.ndarray, np.ndarray]:
    coef_s, coef_d, mean_s, mean_d = model
    feats, ok = _pat_features(ws)
    sbp = np.full(len(ws), mean_s)
    dbp = np.full(len(ws), mean_d)
    if coef_s is not None and coef_d is not None:
        sbp[ok] = feats[ok] @ coef_s
        dbp[ok] = feats[ok] @ coef_d
    return sbp, dbp


def cross_validated(ws: WindowSet, k: int, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Out-of-fold predictions of the fitted baselines (population mean, PAT regression) on ``ws``, every
    window predicted by a fit that never saw its subject."""
    out = {name: (np.zeros(len(ws)), np.zeros(len(ws))) for name in ("population_mean_cv", "pat_regression_cv")}
    if len(ws.subjects) < 2:
        return {}
    for tr, te in group_kfold(ws.subject, k, seed):
        assert_disjoint(ws.subject[tr], ws.subject[te])
        train, test = ws.subset(tr), ws.subset(te)
        out["population_mean_cv"][0][te] = float(train.sbp.mean())
        out["population_mean_cv"][1][te] = float(train.dbp.mean())
        s, d = predict_pat(fit_pat(train), test)
        out["pat_regression_cv"][0][te] = s
        out["pat_regression_cv"][1][te] = d
    return out
