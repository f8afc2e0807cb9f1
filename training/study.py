"""Validation like a clinical study, on real recordings: record-grouped k-fold cross-validation of the training
recipe, several seeds, both modes, baselines in the same folds, bootstrap confidence intervals over records,
split-conformal intervals, and the live system's calibration protocol.

Protocol (each step asserts that no record is on both sides of a split):

* folds: records dealt into ``k`` folds; for each test fold, the training records are split again (20%) into an
  inner validation set that drives early stopping, fits the calibration gains and the conformal half-widths.
  The test fold is never seen before it is scored.
* calibration-free: the model's output as it is; baselines: the training records' population mean, and a
  gradient-boosting model on hand-made pulse features (:mod:`bpstream.training.features`).
* calibrated (how cuffless monitors are used): a record's cuff reading is the mean true SBP/DBP of its windows
  in the first ``cal_seconds`` plus a simulated cuff error (Gaussian, SD ``cuff_sd``, fixed seed); the model's
  reference is its mean output on the usable windows of that period; estimates are
  ``cuff + gain * (model - reference)`` (:mod:`bpstream.shared.model.calibration`), scored on the windows that
  start after that period. Baselines: the cuff carried forward, and a ridge model of the change in features
  (pulse arrival time only as a change from the calibration windows).
* intervals: split conformal over the inner validation records' windows, at ``nominal`` coverage, per mode;
  coverage is measured on the test folds.
* CIs: 95% percentile bootstrap over records (windows of one record move together), also for the difference
  between the model and each baseline.

Records are not patients (cinc2015 has no patient ids; one patient may own several records), so AAMI and BHS
verdicts, which are defined over subjects, are reported as "n/a" with that reason.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.model.calibration import NOMINAL_COVERAGE, calibrated_array, conformal_half_width
from bpstream.training.data import WindowSet
from bpstream.training.features import FEATURE_NAMES, feature_matrix
from bpstream.training.metrics import error_metrics, plot_pair
from bpstream.training.splits import assert_disjoint, group_kfold, split_subjects

Log = Callable[[str], None]
BP = ("sbp", "dbp")
RANGES = (("<90", -np.inf, 90.0), ("90-140", 90.0, 140.0), (">=140", 140.0, np.inf))


@dataclass(slots=True)
class StudyConfig:
    folds: int = 5
    seeds: tuple[int, ...] = (0, 1, 2)
    cal_seconds: float = 30.0
    cuff_sd: float = 5.0
    cuff_seed: int = 2015
    inner_fraction: float = 0.2
    nominal: float = NOMINAL_COVERAGE
    bootstrap: int = 2000
    change_mmhg: float = 10.0
    fold_seed: int = 0


@dataclass(slots=True)
class Calibrations:
    """The calibration protocol applied to a set of windows (all arrays aligned with the windows)."""

    cuff: np.ndarray  # (N, 2) the record's simulated cuff reading (NaN: record not calibratable)
    cal_true: np.ndarray  # (N, 2) the record's true mean pressure over the calibration period
    scored: np.ndarray  # (N,) bool: window starts after the calibration period and its record is calibrated
    in_cal: np.ndarray  # (N,) bool: window lies inside the calibration period
    info: dict[str, int] = field(default_factory=dict)


def calibration_protocol(usable: WindowSet, labelled: WindowSet, cfg: StudyConfig) -> Calibrations:
    """Cuff readings per record from ``labelled`` (every window with a pressure label, usable PPG or not, since
    a cuff does not need the PPG) and the windows of ``usable`` to score."""
    from bpstream.shared.modelspec import WINDOW_SECONDS

    n = len(usable)
    cuff = np.full((n, 2), np.nan)
    cal_true = np.full((n, 2), np.nan)
    in_cal = usable.t_start + WINDOW_SECONDS <= cfg.cal_seconds + 1e-9
    scored = np.zeros(n, dtype=bool)
    no_cuff = no_reference = 0
    for rec in np.unique(usable.subject):
        idx = np.flatnonzero(usable.subject == rec)
        lab = (labelled.subject == rec) & (labelled.t_start + WINDOW_SECONDS <= cfg.cal_seconds + 1e-9)
        if not lab.any():
            no_cuff += 1
            continue
        if not in_cal[idx].any():
            no_reference += 1
            continue
        truth = np.array([labelled.sbp[lab].mean(), labelled.dbp[lab].mean()], dtype=np.float64)
        rng = np.random.default_rng([cfg.cuff_seed, zlib.crc32(str(rec).encode())])
        cuff[idx] = truth + rng.normal(0.0, cfg.cuff_sd, size=2)
        cal_true[idx] = truth
        scored[idx] = usable.t_start[idx] >= cfg.cal_seconds - 1e-9
    return Calibrations(cuff, cal_true, scored, in_cal,
                        {"records_without_cuff_period": no_cuff, "records_without_usable_reference": no_reference})


def references(pred: np.ndarray, subject: np.ndarray, in_cal: np.ndarray) -> np.ndarray:
    """Per window, the mean of its record's predictions ``(N, 2)`` over the calibration windows."""
    ref = np.full((len(pred), 2), np.nan)
    for rec in np.unique(subject):
        idx = np.flatnonzero(subject == rec)
        cal = idx[in_cal[idx]]
        if cal.size:
            ref[idx] = pred[cal, :2].mean(axis=0)
    return ref


def fit_gain(pred: np.ndarray, ref: np.ndarray, truth: np.ndarray, cuff: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Least-squares gain in [0, 1] per pressure for ``truth - cuff ~ gain * (pred - ref)`` on ``mask``."""
    gains = np.ones(2)
    for j in range(2):
        dx = (pred[mask, j] - ref[mask, j]).astype(np.float64)
        dy = (truth[mask, j] - cuff[mask, j]).astype(np.float64)
        ok = np.isfinite(dx) & np.isfinite(dy)
        denom = float(np.sum(dx[ok] ** 2))
        gains[j] = float(np.clip(np.sum(dx[ok] * dy[ok]) / denom, 0.0, 1.0)) if denom > 1e-9 else 0.0
    return gains


def fit_shrink(pred: np.ndarray, truth: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Per pressure, the factor in [0, 1] by which the model's deviation from the training mean is scaled,
    least squares on held-out records: ``truth - mean ~ shrink * (pred - mean)``."""
    return fit_gain(pred, np.broadcast_to(mean, pred.shape), truth, np.broadcast_to(mean, pred.shape),
                    np.ones(len(pred), dtype=bool))


def with_shrink(result: Any, pred_val: np.ndarray, truth_val: np.ndarray) -> np.ndarray:
    """Fit the shrinkage on the inner validation predictions and store it in ``result.stats.extra`` (read by
    :class:`~bpstream.shared.model.network.Deployable`); returns the factors."""
    mean = np.array([result.stats.sbp_mean, result.stats.dbp_mean])
    shrink = fit_shrink(pred_val, truth_val, mean)
    result.stats.extra = {**result.stats.extra, "shrink_sbp": float(shrink[0]), "shrink_dbp": float(shrink[1])}
    return shrink


def record_bootstrap(abs_err: np.ndarray, subject: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile CI of the mean of ``abs_err`` (``(N,)``, or ``(S, N)`` averaged over seeds first) with
    records resampled with replacement."""
    e = np.asarray(abs_err, dtype=np.float64)
    e = e.mean(axis=0) if e.ndim == 2 else e
    ok = np.isfinite(e)
    e, subject = e[ok], subject[ok]
    if e.size == 0:
        return float("nan"), float("nan")
    recs, inv = np.unique(subject, return_inverse=True)
    sums = np.bincount(inv, weights=e, minlength=recs.size)
    counts = np.bincount(inv, minlength=recs.size).astype(np.float64)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(recs.size, np.full(recs.size, 1.0 / recs.size), size=n_boot).astype(np.float64)
    stats = (w @ sums) / np.maximum(w @ counts, 1e-9)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def _metrics(est: np.ndarray, truth: np.ndarray, subject: np.ndarray, cfg: StudyConfig) -> dict[str, Any]:
    """Metric dict per pressure for estimates ``(S, N, 2)`` (seeds averaged: the mean of per-seed metrics)."""
    out: dict[str, Any] = {}
    for j, bp in enumerate(BP):
        per_seed = [error_metrics(e[:, j], truth[:, j]) for e in est]
        m = {k: (float(np.mean([p[k] for p in per_seed])) if isinstance(per_seed[0][k], float) else per_seed[0][k])
             for k in per_seed[0]}
        m["mae_per_seed"] = [p["mae"] for p in per_seed]
        m["n_records"] = int(np.unique(subject).size)
        m["bhs_grade"] = m["aami_pass"] = None
        m["verdicts"] = ("n/a: records are not subjects (no patient ids; one patient may own several records), "
                         "and AAMI/BHS are defined over at least 85 subjects")
        out[bp] = m
    return out


def _ci_block(est: np.ndarray, truth: np.ndarray, subject: np.ndarray, cfg: StudyConfig) -> dict[str, Any]:
    return {"mae": {bp: list(record_bootstrap(np.abs(est[:, :, j] - truth[:, j]), subject, cfg.bootstrap))
                    for j, bp in enumerate(BP)}}


def _improvement(model: np.ndarray, base: np.ndarray, truth: np.ndarray, subject: np.ndarray,
                 cfg: StudyConfig) -> dict[str, Any]:
    """Baseline MAE minus model MAE (positive: the model is better), with its record-bootstrap CI."""
    out = {}
    for j, bp in enumerate(BP):
        diff = np.abs(base[:, :, j] - truth[:, j]).mean(axis=0) - np.abs(model[:, :, j] - truth[:, j]).mean(axis=0)
        lo, hi = record_bootstrap(diff, subject, cfg.bootstrap, seed=1)
        out[bp] = {"mae_difference": float(diff.mean()), "ci95": [lo, hi]}
    return out


def _by_range(est: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    out = {}
    for name, lo, hi in RANGES:
        m = (truth[:, 0] >= lo) & (truth[:, 0] < hi)
        out[name] = {"n": int(m.sum()), **{f"{bp}_mae": (float(np.abs(est[:, m, j] - truth[m, j]).mean())
                                                         if m.any() else None) for j, bp in enumerate(BP)}}
    return out


def _interval_block(est: np.ndarray, half: np.ndarray, truth: np.ndarray, nominal: float) -> dict[str, Any]:
    """Coverage and mean width of ``est +/- half`` (``half`` is ``(S, N, 2)``)."""
    out: dict[str, Any] = {"nominal": nominal}
    for j, bp in enumerate(BP):
        inside = np.abs(est[:, :, j] - truth[:, j]) <= half[:, :, j]
        out[bp] = {"coverage": float(inside.mean()), "mean_width": float((2 * half[:, :, j]).mean())}
    out["coverage"] = float(np.mean([out[bp]["coverage"] for bp in BP]))
    out["mean_width"] = {bp: out[bp]["mean_width"] for bp in BP}
    return out


def _feature_models(f_tr: np.ndarray, y_tr: np.ndarray, f_te: np.ndarray) -> np.ndarray:
    from sklearn.ensemble import HistGradientBoostingRegressor

    keep = np.isfinite(f_tr).any(axis=0)  # a feature never measured in training (e.g. PAT without ECG)
    f_tr, f_te = f_tr[:, keep], f_te[:, keep]
    out = np.zeros((len(f_te), 2))
    for j in range(2):
        m = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15,
                                          l2_regularization=1.0, random_state=0)
        m.fit(f_tr, y_tr[:, j])
        out[:, j] = m.predict(f_te)
    return out


def _delta_features(feats: np.ndarray, subject: np.ndarray, in_cal: np.ndarray) -> np.ndarray:
    """Features minus their record's mean over the calibration windows (NaN-tolerant)."""
    out = np.full_like(feats, np.nan)
    for rec in np.unique(subject):
        idx = np.flatnonzero(subject == rec)
        cal = idx[in_cal[idx]]
        if cal.size:
            measured = np.isfinite(feats[cal]).any(axis=0)
            base = np.full(feats.shape[1], np.nan)
            base[measured] = np.nanmean(feats[cal][:, measured], axis=0)
            out[idx] = feats[idx] - base
    return out


def _ridge_delta(d_tr: np.ndarray, y_tr: np.ndarray, d_te: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import RidgeCV

    def clean(d: np.ndarray) -> np.ndarray:
        return np.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0)

    ok = np.isfinite(y_tr).all(axis=1)
    out = np.zeros((len(d_te), 2))
    for j in range(2):
        m = RidgeCV(alphas=np.logspace(-2, 3, 12)).fit(clean(d_tr[ok]), y_tr[ok, j])
        out[:, j] = m.predict(clean(d_te))
    return out


def train_fn_default(train: WindowSet, val: WindowSet, seed: int) -> Any:
    """Train the product's network with the real-signal recipe (see :func:`real_recipe`)."""
    from bpstream.training.train import train_model

    net_cfg, train_cfg = real_recipe(seed)
    return train_model(train, val, net_cfg, train_cfg)


def real_recipe(seed: int = 0, max_epochs: int = 30, batches_per_epoch: int | None = 40,
                progress: bool = True) -> tuple[Any, Any]:
    """The network and training settings for real signals (kept small: 2 CPU cores train it)."""
    from bpstream.shared.model.network import NetworkConfig
    from bpstream.training.train import TrainConfig

    net = NetworkConfig(stage_channels=(16, 24, 32, 48), lstm_hidden=48, ppg_derivatives=True, dropout=0.2)
    cfg = TrainConfig(lr=2e-3, batch_size=64, max_epochs=max_epochs, patience=6, seed=seed, ecg_dropout=0.5,
                      weight_decay=5e-2, max_batches=batches_per_epoch, augment=True, pair_weight=1.0,
                      time_warp=0.1, delay_jitter_s=0.04, wander=0.3, lowpass_max=5, loss="huber",
                      progress=progress)
    return net, cfg


def run_study(labelled: WindowSet, out_dir: Path, cfg: StudyConfig | None = None,
              train_fn: Callable[[WindowSet, WindowSet, int], Any] = train_fn_default,
              log: Log = print) -> dict[str, Any]:
    """Cross-validate the recipe on ``labelled`` windows (all labelled windows; usable ones are scored)."""
    from bpstream.training.train import predict_net

    cfg = cfg or StudyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    ws = labelled.subset(labelled.quality_ok)
    n, n_seeds = len(ws), len(cfg.seeds)
    truth = np.stack([ws.sbp, ws.dbp], axis=1).astype(np.float64)
    cal = calibration_protocol(ws, labelled, cfg)
    log(f"study: {n} usable windows of {np.unique(ws.subject).size} records; "
        f"{cfg.folds} record-grouped folds x {n_seeds} seeds")
    feats = feature_matrix(ws.x, ws.hr, ws.pat)
    dfeats = _delta_features(feats, ws.subject, cal.in_cal)

    pred = np.full((n_seeds, n, 2), np.nan)
    cal_pred = np.full((n_seeds, n, 2), np.nan)
    half_free = np.full((n_seeds, n, 2), np.nan)
    half_cal = np.full((n_seeds, n, 2), np.nan)
    base_mean, base_feat, base_feat_cal = _fold_baselines(ws, truth, cal, feats, dfeats, cfg)
    fold_log: list[dict[str, Any]] = []
    for fold, (tr, te) in enumerate(group_kfold(ws.subject, cfg.folds, cfg.fold_seed)):
        assert_disjoint(ws.subject[tr], ws.subject[te])
        train_all = ws.subset(tr)
        inner_tr, inner_va = split_subjects(train_all.subject, cfg.inner_fraction, seed=cfg.fold_seed + fold)
        tr_idx, va_idx = tr[inner_tr], tr[inner_va]
        assert_disjoint(ws.subject[tr_idx], ws.subject[va_idx])
        assert_disjoint(ws.subject[va_idx], ws.subject[te])
        for s, seed in enumerate(cfg.seeds):
            t0 = time.perf_counter()
            result = train_fn(ws.subset(tr_idx), ws.subset(va_idx), seed)
            shrink = with_shrink(result, predict_net(result.net, ws.x[va_idx], result.stats)[:, :2], truth[va_idx])
            p_te = predict_net(result.net, ws.x[te], result.stats)[:, :2].astype(np.float64)
            p_va = predict_net(result.net, ws.x[va_idx], result.stats)[:, :2].astype(np.float64)
            pred[s, te] = p_te
            # Gain and conformal half-widths from the inner validation records only.
            ref_va = references(p_va, ws.subject[va_idx], cal.in_cal[va_idx])
            m_va = cal.scored[va_idx]
            gain = fit_gain(p_va, ref_va, truth[va_idx], cal.cuff[va_idx], m_va)
            cal_va = calibrated_array(p_va, cal.cuff[va_idx], ref_va, gain)
            hw_free = [conformal_half_width(np.abs(p_va[:, j] - truth[va_idx, j]), cfg.nominal) for j in range(2)]
            hw_cal = [conformal_half_width(np.abs(cal_va[m_va, j] - truth[va_idx][m_va, j]), cfg.nominal)
                      for j in range(2)]
            ref_te = references(p_te, ws.subject[te], cal.in_cal[te])
            cal_pred[s, te] = calibrated_array(p_te, cal.cuff[te], ref_te, gain)
            half_free[s, te] = hw_free
            half_cal[s, te] = hw_cal
            fold_log.append({"fold": fold, "seed": seed, "train_records": int(np.unique(ws.subject[tr_idx]).size),
                             "val_records": int(np.unique(ws.subject[va_idx]).size),
                             "test_records": int(np.unique(ws.subject[te]).size), "gain": gain.tolist(),
                             "shrink": shrink.tolist(),
                             "half_width_free": hw_free, "half_width_calibrated": hw_cal,
                             "best_epoch": int(result.best_epoch), "val_mae": float(result.best_val_mae),
                             "test_mae_sbp": float(np.abs(p_te[:, 0] - truth[te, 0]).mean()),
                             "seconds": round(time.perf_counter() - t0, 1)})
            log(f"fold {fold + 1}/{cfg.folds} seed {seed}: test SBP MAE {fold_log[-1]['test_mae_sbp']:.1f} "
                f"(population mean {np.abs(base_mean[te, 0] - truth[te, 0]).mean():.1f}), shrink "
                f"{shrink[0]:.2f}/{shrink[1]:.2f}, gain {gain[0]:.2f}/{gain[1]:.2f}, {fold_log[-1]['seconds']:.0f} s")

    report = summarise(ws, truth, cal, pred, cal_pred, half_free, half_cal, base_mean, base_feat,
                       base_feat_cal, cfg)
    report["folds_detail"] = fold_log
    report["n_records_rejected"] = int(labelled.info.get("screening", {}).get("records_without_usable_window", 0))
    report["screening"] = labelled.info.get("screening", {})
    report["seconds"] = round(time.perf_counter() - began, 1)
    report["config"] = asdict(cfg)
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    np.savez_compressed(out_dir / "predictions.npz", pred=pred, cal_pred=cal_pred, truth=truth,
                        subject=ws.subject, t_start=ws.t_start, scored=cal.scored, cuff=cal.cuff,
                        half_free=half_free, half_cal=half_cal)
    plots(pred, cal_pred, truth, cal.scored, out_dir)
    return report


def _fold_baselines(ws: WindowSet, truth: np.ndarray, cal: Calibrations, feats: np.ndarray, dfeats: np.ndarray,
                    cfg: StudyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Out-of-fold population mean, feature model and calibrated feature-change model (record-grouped)."""
    n = len(ws)
    base_mean, base_feat, base_feat_cal = (np.full((n, 2), np.nan) for _ in range(3))
    for tr, te in group_kfold(ws.subject, cfg.folds, cfg.fold_seed):
        assert_disjoint(ws.subject[tr], ws.subject[te])
        base_mean[te] = truth[tr].mean(axis=0)
        base_feat[te] = _feature_models(feats[tr], truth[tr], feats[te])
        tr_cal = tr[cal.scored[tr]]
        base_feat_cal[te] = cal.cuff[te] + _ridge_delta(dfeats[tr_cal], truth[tr_cal] - cal.cuff[tr_cal], dfeats[te])
    return base_mean, base_feat, base_feat_cal


def external_evaluation(labelled: WindowSet, model_dir: Path, out_dir: Path, cfg: StudyConfig | None = None,
                        log: Log = print) -> dict[str, Any]:
    """The committed model on records it never saw (e.g. mimic3-windows): the study's metrics and protocol,
    with the gains and interval half-widths from the model's metadata; baselines fitted in record-grouped folds
    of these records (so they know this population; the model does not)."""
    from bpstream.shared.model.calibration import IntervalSpec
    from bpstream.shared.model.runtime import load_model

    cfg = cfg or StudyConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ws = labelled.subset(labelled.quality_ok)
    truth = np.stack([ws.sbp, ws.dbp], axis=1).astype(np.float64)
    cal = calibration_protocol(ws, labelled, cfg)
    model = load_model(model_dir)
    pred = np.zeros((len(ws), 2))
    for i in range(0, len(ws), 256):
        p = model.predict(ws.x[i:i + 256])
        pred[i:i + 256] = np.stack([p.sbp, p.dbp], axis=1)
    spec = IntervalSpec.from_dict(model.metadata.intervals)
    ref = references(pred, ws.subject, cal.in_cal)
    cal_pred = calibrated_array(pred, cal.cuff, ref, np.array([spec.gain_sbp, spec.gain_dbp]))
    half_free = np.broadcast_to(np.array(spec.half_widths("uncalibrated")), pred.shape)
    half_cal = np.broadcast_to(np.array(spec.half_widths("calibrated")), pred.shape)
    feats = feature_matrix(ws.x, ws.hr, ws.pat)
    dfeats = _delta_features(feats, ws.subject, cal.in_cal)
    base_mean, base_feat, base_feat_cal = _fold_baselines(ws, truth, cal, feats, dfeats, cfg)
    report = summarise(ws, truth, cal, pred[None], cal_pred[None], half_free[None], half_cal[None], base_mean,
                       base_feat, base_feat_cal, replace(cfg, seeds=(0,)))
    report["model_version"] = model.metadata.version
    report["screening"] = labelled.info.get("screening", {})
    report["n_records_rejected"] = int(report["screening"].get("records_without_usable_window", 0))
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    plots(pred[None], cal_pred[None], truth, cal.scored, out_dir)
    f, c = report["calibration_free"], report["calibrated"]
    log(f"{model.metadata.version} on {report['n_records']} records: calibration-free SBP MAE {f['sbp']['mae']:.1f} "
        f"(population mean {f['baselines']['population_mean']['sbp']['mae']:.1f}); calibrated "
        f"{c['sbp']['mae']:.1f} (carried forward {c['baselines']['carried_forward']['sbp']['mae']:.1f})")
    return report


def summarise(ws: WindowSet, truth: np.ndarray, cal: Calibrations, pred: np.ndarray, cal_pred: np.ndarray,
              half_free: np.ndarray, half_cal: np.ndarray, base_mean: np.ndarray, base_feat: np.ndarray,
              base_feat_cal: np.ndarray, cfg: StudyConfig) -> dict[str, Any]:
    """The metrics.json body from out-of-fold predictions (seeds on the first axis)."""
    subj = ws.subject
    n_seeds = pred.shape[0]

    def rep(x: np.ndarray) -> np.ndarray:
        return np.broadcast_to(x, (n_seeds, *x.shape))

    free: dict[str, Any] = _metrics(pred, truth, subj, cfg)
    free["ci95"] = _ci_block(pred, truth, subj, cfg)
    free["baselines"] = {"population_mean": _metrics(rep(base_mean)[:1], truth, subj, cfg),
                         "features": _metrics(rep(base_feat)[:1], truth, subj, cfg)}
    for name, base in (("population_mean", base_mean), ("features", base_feat)):
        free["baselines"][name]["ci95"] = _ci_block(base[None], truth, subj, cfg)
    free["improvement_over"] = {"population_mean": _improvement(pred, rep(base_mean), truth, subj, cfg),
                                "features": _improvement(pred, rep(base_feat), truth, subj, cfg)}
    free["intervals"] = _interval_block(pred, half_free, truth, cfg.nominal)
    free["by_range"] = _by_range(pred, truth)

    m = cal.scored
    t_c, s_c = truth[m], subj[m]
    carried = cal.cuff[m]
    calib: dict[str, Any] = _metrics(cal_pred[:, m], t_c, s_c, cfg)
    calib["ci95"] = _ci_block(cal_pred[:, m], t_c, s_c, cfg)
    calib["baselines"] = {"carried_forward": _metrics(carried[None], t_c, s_c, cfg),
                          "features": _metrics(base_feat_cal[m][None], t_c, s_c, cfg),
                          "population_mean": _metrics(base_mean[m][None], t_c, s_c, cfg)}
    for name, base in (("carried_forward", carried), ("features", base_feat_cal[m])):
        calib["baselines"][name]["ci95"] = _ci_block(base[None], t_c, s_c, cfg)
    calib["improvement_over"] = {"carried_forward": _improvement(cal_pred[:, m], rep(carried), t_c, s_c, cfg),
                                 "features": _improvement(cal_pred[:, m], rep(base_feat_cal[m]), t_c, s_c, cfg)}
    calib["intervals"] = _interval_block(cal_pred[:, m], half_cal[:, m], t_c, cfg.nominal)
    calib["by_range"] = _by_range(cal_pred[:, m], t_c)
    moved = np.abs(t_c[:, 0] - cal.cal_true[m][:, 0]) >= cfg.change_mmhg
    calib["changes"] = {
        "threshold_mmhg": cfg.change_mmhg, "n": int(moved.sum()), "n_records": int(np.unique(s_c[moved]).size),
        "model": {f"{bp}_mae": float(np.abs(cal_pred[:, m][:, moved, j] - t_c[moved, j]).mean())
                  for j, bp in enumerate(BP)} if moved.any() else {},
        "carried_forward": {f"{bp}_mae": float(np.abs(carried[moved, j] - t_c[moved, j]).mean())
                            for j, bp in enumerate(BP)} if moved.any() else {},
        "features": {f"{bp}_mae": float(np.abs(base_feat_cal[m][moved, j] - t_c[moved, j]).mean())
                     for j, bp in enumerate(BP)} if moved.any() else {},
        "ci95": _ci_block(cal_pred[:, m][:, moved], t_c[moved], s_c[moved], cfg) if moved.any() else {},
        "improvement_over_carried_forward": _improvement(cal_pred[:, m][:, moved], rep(carried[moved]),
                                                         t_c[moved], s_c[moved], cfg) if moved.any() else {},
    }
    calib["protocol"] = {"cal_seconds": cfg.cal_seconds, "cuff_sd": cfg.cuff_sd, "cuff_seed": cfg.cuff_seed,
                         **cal.info}
    return {"calibration_free": free, "calibrated": calib, "n_subjects": int(np.unique(subj).size),
            "n_records": int(np.unique(subj).size), "n_windows": len(ws),
            "n_windows_calibrated": int(m.sum()), "folds": cfg.folds, "seeds": list(cfg.seeds),
            "features": list(FEATURE_NAMES)}


def plots(pred: np.ndarray, cal_pred: np.ndarray, truth: np.ndarray, scored: np.ndarray, out_dir: Path) -> None:
    """Bland-Altman and estimate-vs-reference plots per mode and pressure (first seed)."""
    for j, bp in enumerate(BP):
        plot_pair(pred[0, :, j], truth[:, j], f"{bp.upper()} calibration-free (out-of-fold)",
                  out_dir / f"bland_altman_free_{bp}.png")
        plot_pair(cal_pred[0, scored, j], truth[scored, j], f"{bp.upper()} calibrated (out-of-fold)",
                  out_dir / f"bland_altman_calibrated_{bp}.png")


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))
