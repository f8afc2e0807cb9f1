"""``bpstream train --data ../shared/data/cinc2015``: the product model, trained on real ICU recordings.

All usable records train the network except an inner 20% of records that drives early stopping (the recipe of
:func:`bpstream.training.study.real_recipe`, the one the cross-validation measured). The artefact's interval
half-widths and calibration gains come from that cross-validation when its report folder is given
(``--study``): the out-of-fold residuals of every record, pooled over seeds, are the conformal calibration set,
and the gains are the median of the folds'. Without a study they come from the inner validation records.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.model.calibration import CALIBRATED, UNCALIBRATED, IntervalSpec, conformal_half_width
from bpstream.training.data import detect_and_load
from bpstream.training.splits import assert_disjoint, split_subjects
from bpstream.training.study import (
    StudyConfig,
    calibrated_array,
    calibration_protocol,
    fit_gain,
    real_recipe,
    references,
    with_shrink,
)
from bpstream.training.train import predict_net, train_model


def intervals_from_study(study_dir: Path, nominal: float) -> IntervalSpec:
    """Half-widths from a study's pooled out-of-fold residuals, gains from the median over its folds."""
    z = np.load(Path(study_dir) / "predictions.npz", allow_pickle=False)
    report = json.loads((Path(study_dir) / "metrics.json").read_text())
    truth, pred, cal_pred, scored = z["truth"], z["pred"], z["cal_pred"], z["scored"]
    free = [conformal_half_width(np.abs(pred[:, :, j] - truth[:, j]), nominal) for j in range(2)]
    cal = [conformal_half_width(np.abs(cal_pred[:, scored, j] - truth[scored, j]), nominal) for j in range(2)]
    gains = np.median(np.array([f["gain"] for f in report["folds_detail"]]), axis=0)
    return IntervalSpec(nominal=nominal, calibrated_sbp=cal[0], calibrated_dbp=cal[1], uncalibrated_sbp=free[0],
                        uncalibrated_dbp=free[1], gain_sbp=float(gains[0]), gain_dbp=float(gains[1]))


def run_real_training(data: Path, out_dir: Path, study_dir: Path | None = None, seed: int = 0,
                      hop_s: float = 4.0, log: Any = print) -> Path:
    """Train on every usable record of ``data``; returns the run folder (``checkpoint.pt``, report)."""
    import torch

    t0 = time.perf_counter()
    kind, labelled = detect_and_load(data, hop_s=hop_s)
    ws = labelled.subset(labelled.quality_ok)
    tr, va = split_subjects(ws.subject, 0.2, seed=seed)
    train, val = ws.subset(tr), ws.subset(va)
    assert_disjoint(train.subject, val.subject)
    log(f"{kind}: training on {len(train)} windows of {len(train.subjects)} records, early stopping on "
        f"{len(val)} windows of {len(val.subjects)} other records")
    net_cfg, cfg = real_recipe(seed)
    res = train_model(train, val, net_cfg, cfg)
    log(f"best inner-validation MAE {res.best_val_mae:.2f} mmHg at epoch {res.best_epoch} ({res.stopped})")
    val_truth = np.stack([val.sbp, val.dbp], axis=1).astype(np.float64)
    shrink = with_shrink(res, predict_net(res.net, val.x, res.stats)[:, :2], val_truth)
    log(f"shrinkage towards the training mean (inner validation): {shrink[0]:.2f}/{shrink[1]:.2f}")

    study_cfg = StudyConfig()
    if study_dir is not None:
        spec = intervals_from_study(study_dir, study_cfg.nominal)
        source = f"pooled out-of-fold residuals of the cross-validation in {Path(study_dir).name}"
    else:
        cal = calibration_protocol(val, labelled, study_cfg)
        p = predict_net(res.net, val.x, res.stats)[:, :2].astype(np.float64)
        truth = val_truth
        ref = references(p, val.subject, cal.in_cal)
        gain = fit_gain(p, ref, truth, cal.cuff, cal.scored)
        cp = calibrated_array(p, cal.cuff, ref, gain)
        m = cal.scored
        spec = IntervalSpec(
            nominal=study_cfg.nominal,
            calibrated_sbp=conformal_half_width(np.abs(cp[m, 0] - truth[m, 0])),
            calibrated_dbp=conformal_half_width(np.abs(cp[m, 1] - truth[m, 1])),
            uncalibrated_sbp=conformal_half_width(np.abs(p[:, 0] - truth[:, 0])),
            uncalibrated_dbp=conformal_half_width(np.abs(p[:, 1] - truth[:, 1])),
            gain_sbp=float(gain[0]), gain_dbp=float(gain[1]))
        source = "the inner validation records"
    log(f"90% half-widths: calibrated {spec.half_widths(CALIBRATED)}, uncalibrated "
        f"{spec.half_widths(UNCALIBRATED)}; gains {spec.gain_sbp:.2f}/{spec.gain_dbp:.2f} (from {source})")
    hr = ws.hr[np.isfinite(ws.hr)]
    input_ranges = {"heart_rate_bpm": [float(np.percentile(hr, 0.5)), float(np.percentile(hr, 99.5))]}

    fingerprint = ws.fingerprint()
    version = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + f"-{fingerprint[:6]}"
    run = Path(out_dir) / version
    run.mkdir(parents=True, exist_ok=True)
    torch.save({"version": version, "net_config": res.net.config.to_dict(), "state_dict": res.net.state_dict(),
                "stats": asdict(res.stats), "cnn": None}, run / "checkpoint.pt")
    report = {
        "version": version, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": {"source": str(data), "kind": kind, "fingerprint": fingerprint, "hop_s": hop_s,
                          "records": len(ws.subjects), "train_records": len(train.subjects),
                          "val_records": len(val.subjects), "train_windows": len(train),
                          "val_windows": len(val), "screening": labelled.info.get("screening", {})},
        "training": {**{k: v for k, v in asdict(cfg).items() if k != "progress"}, "device": res.device,
                     "best_epoch": res.best_epoch, "epochs_run": len(res.history), "stopped": res.stopped,
                     "seconds": round(res.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1)},
        "validation_metrics": {"inner_val_mae": res.best_val_mae, "intervals_from": source},
        "intervals": spec.to_dict(),
        "input_ranges": input_ranges,
    }
    (run / "train_report.json").write_text(json.dumps(report, indent=2))
    log(f"run saved in {run}")
    return run
