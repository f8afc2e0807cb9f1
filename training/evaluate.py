"""``bpstream evaluate``: subject-independent accuracy of an exported model on simulated and real data, with
baselines on the same windows and splits, plots, the stage confusion matrix, transfer to real signals
(optionally fine-tuned on half the MIMIC-III records and tested on the other half, split by record), and, on
simulated cohorts, the alerting evaluation (crisis sensitivity, false alerts per patient-day, detection delay).

Outputs per data folder: ``metrics.json`` (exactly: calibration_free, calibrated, n_subjects, n_windows),
``details.json`` (baselines, PPG-only, stages, alerts, transfer, data description), ``REPORT.md`` and PNGs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.anomaly import AlertConfig, AlertDetector, Reading, bp_category
from bpstream.training.data import WindowSet, detect_and_load
from bpstream.training.metrics import (
    carried_forward,
    error_metrics,
    paired_report,
    plot_pair,
    stage_confusion,
)

Log = Callable[[str], None]


def _model_predict(model: Any, x: np.ndarray, batch: int = 256) -> np.ndarray:
    out = np.zeros((len(x), 5), dtype=np.float32)
    for i in range(0, len(x), batch):
        p = model.predict(x[i:i + batch])
        out[i:i + batch] = np.stack([p.sbp, p.dbp, p.sbp_sd, p.dbp_sd, p.anomaly_prob], axis=1)
    return out


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    """Compact view of a paired report: MAE/ME/SD/grade per section."""
    out: dict[str, Any] = {}
    for sec in ("calibration_free", "calibrated"):
        for bp in ("sbp", "dbp"):
            m = report[sec][bp]
            out[f"{sec}.{bp}"] = {k: (None if m[k] is None else (round(m[k], 2) if isinstance(m[k], float)
                                                                  else m[k]))
                                  for k in ("mae", "rmse", "me", "sd", "bhs_grade", "aami_pass", "n")}
    return out


def _free_only(summary: dict[str, Any]) -> dict[str, Any]:
    """A constant estimate calibrated is the carried-forward reading: report it calibration-free only."""
    return {k: v for k, v in summary.items() if not k.startswith("calibrated.")}


def _crisis_episodes(t_end: np.ndarray, sbp: np.ndarray, dbp: np.ndarray, min_windows: int = 5,
                     ) -> list[tuple[float, float]]:
    """True crisis episodes of one subject: runs of >= ``min_windows`` windows whose reference pressure is in
    the crisis category (gaps of up to 2 windows bridged). Returns (start_s, end_s) of each."""
    crisis = np.array([bp_category(s, d) == "crisis" for s, d in zip(sbp, dbp, strict=True)])
    episodes: list[tuple[float, float]] = []
    i, n = 0, len(crisis)
    while i < n:
        if not crisis[i]:
            i += 1
            continue
        j, last = i, i
        while j < n and (crisis[j] or (j - last) <= 2):
            if crisis[j]:
                last = j
            j += 1
        if crisis[i:last + 1].sum() >= min_windows:
            episodes.append((float(t_end[i]), float(t_end[last])))
        i = last + 1
    return episodes


def alert_evaluation(ws: WindowSet, sbp_est: np.ndarray, dbp_est: np.ndarray, sd_est: np.ndarray,
                     config: AlertConfig | None = None, margin_s: float = 60.0) -> dict[str, Any]:
    """Run the live alert detector per subject over its windows in time order (poor windows flagged, not
    scored). A true crisis episode is detected when a crisis alert is raised between its start - margin and
    its end; a crisis alert far (> margin) from every true episode is false. Delay: raise time - start."""
    cfg = config or AlertConfig()
    detected, total_eps, false_alerts, delays = 0, 0, 0, []
    kinds: dict[str, int] = {}
    seconds = 0.0
    for subj in ws.subjects:
        idx = np.flatnonzero(ws.subject == subj)
        idx = idx[np.argsort(ws.t_start[idx])]
        t_end = ws.t_start[idx] + 8.0
        seconds += float(t_end[-1] - ws.t_start[idx][0]) if len(idx) else 0.0
        eps = _crisis_episodes(t_end, ws.sbp[idx], ws.dbp[idx])
        det = AlertDetector(cfg)
        raises: list[float] = []
        for k, i in enumerate(idx):
            ev = det.update(Reading("eval", "subject", round(t_end[k] * 1e9), float(sbp_est[i]),
                                    float(dbp_est[i]), float(sd_est[i]), float(sd_est[i]), bool(ws.quality_ok[i])))
            for e in ev:
                if e.state == "raised":
                    kinds[e.kind] = kinds.get(e.kind, 0) + 1
                    if e.kind == "crisis":
                        raises.append(e.event_ns / 1e9)
        total_eps += len(eps)
        for start, end in eps:
            hits = [r for r in raises if start - margin_s <= r <= end + margin_s]
            if hits:
                detected += 1
                delays.append(max(0.0, min(hits) - start))
        for r in raises:
            if not any(start - margin_s <= r <= end + margin_s for start, end in eps):
                false_alerts += 1
    days = seconds / 86400.0
    return {"crisis_episodes": total_eps, "crisis_detected": detected,
            "crisis_sensitivity": detected / total_eps if total_eps else None,
            "false_crisis_alerts": false_alerts,
            "false_crisis_alerts_per_patient_day": false_alerts / days if days > 0 else None,
            "median_detection_delay_s": float(np.median(delays)) if delays else None,
            "patient_days": days, "raised_by_kind": kinds,
            "rule": f"episode = >=5 windows with reference in crisis category; hit within -{margin_s:.0f} s of "
                    "its start to its end; false = crisis alert >60 s from every true episode"}


def _finetune_mimic(ws: WindowSet, weights: Path, log: Log, seed: int = 0) -> dict[str, Any]:
    """Two-fold by record: fine-tune on one half, predict the other; pooled out-of-fold predictions."""
    from bpstream.training.export import build_net, load_checkpoint
    from bpstream.training.splits import assert_disjoint, group_kfold
    from bpstream.training.train import TrainConfig, predict_net, train_model

    ckpt = load_checkpoint(weights)
    base, stats = build_net(ckpt)
    pred = np.zeros((len(ws), 5), dtype=np.float32)
    for fold, (tr, te) in enumerate(group_kfold(ws.subject, 2, seed)):
        assert_disjoint(ws.subject[tr], ws.subject[te])
        train_all = ws.subset(tr)
        inner_tr, inner_va = next(group_kfold(train_all.subject, 4, seed + 1))
        cfg = TrainConfig(lr=1e-4, max_epochs=30, patience=5, seed=seed, progress=False, ecg_dropout=0.3)
        res = train_model(train_all.subset(inner_tr), train_all.subset(inner_va), cfg=cfg, init=base, stats=stats)
        log(f"fine-tune fold {fold}: {len(train_all.subjects)} records, best inner-val MAE "
            f"{res.best_val_mae:.2f} at epoch {res.best_epoch}")
        pred[te] = predict_net(res.net, ws.x[te], stats)
    report = paired_report(pred[:, 0], pred[:, 1], ws.sbp, ws.dbp, ws.subject, ws.t_start)
    return {"protocol": "2-fold by record: fine-tune (lr 1e-4, early stopping on 1/4 of the training records) "
                        "on one half, test on the other; out-of-fold predictions pooled",
            **report}


def evaluate_windows(ws: WindowSet, kind: str, model_dir: Path, out: Path, folds: int, finetune: bool,
                     log: Log) -> dict[str, Any]:
    """Evaluate one data set's windows; write metrics.json, details.json, REPORT.md and plots into ``out``."""
    from bpstream.shared.model.metadata import WEIGHTS_FILE
    from bpstream.shared.model.runtime import load_model
    from bpstream.training.baselines import cross_validated, fit_pat, predict_pat

    out.mkdir(parents=True, exist_ok=True)
    model = load_model(model_dir, "torchscript", device="auto")
    meta = model.metadata
    n_total = len(ws)
    flagged = ~ws.quality_ok
    all_ws = ws
    good = ws.subset(ws.quality_ok)
    log(f"[{kind}] {n_total} windows from {len(ws.subjects)} subjects; {int(flagged.sum())} flagged poor "
        f"quality (excluded, not scored); evaluating {len(good)} windows of {len(good.subjects)} subjects")
    if len(good) == 0:
        raise ValueError(f"no usable windows in {kind}")
    pred = _model_predict(model, good.x)
    metrics = paired_report(pred[:, 0], pred[:, 1], good.sbp, good.dbp, good.subject, good.t_start)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    x_ppg = good.x.copy()
    x_ppg[:, 0] = 0.0
    pred_ppg = _model_predict(model, x_ppg)
    ppg_only = paired_report(pred_ppg[:, 0], pred_ppg[:, 1], good.sbp, good.dbp, good.subject, good.t_start)

    baselines: dict[str, Any] = {}
    ts = meta.target_stats
    pop_s = np.full(len(good), ts.get("sbp_mean", float("nan")))
    pop_d = np.full(len(good), ts.get("dbp_mean", float("nan")))
    baselines["population_mean_training"] = {
        "what": "mean pressure of the model's training population, for everyone (calibration-free)",
        **_free_only(_summary(paired_report(pop_s, pop_d, good.sbp, good.dbp, good.subject, good.t_start)))}
    cf_s = carried_forward(good.sbp, good.subject, good.t_start)
    cf_d = carried_forward(good.dbp, good.subject, good.t_start)
    keep = np.ones(len(good), bool)
    for s in good.subjects:
        idx = np.flatnonzero(good.subject == s)
        keep[idx[np.argmin(good.t_start[idx])]] = False
    baselines["calibration_carried_forward"] = {
        "what": "each subject's first reference reading carried forward (calibrated section only)",
        "calibrated.sbp": error_metrics(cf_s[keep], good.sbp[keep]),
        "calibrated.dbp": error_metrics(cf_d[keep], good.dbp[keep])}
    for name, (s, d) in cross_validated(good, folds).items():
        summary = _summary(paired_report(s, d, good.sbp, good.dbp, good.subject, good.t_start))
        baselines[name] = {"what": f"{name.removesuffix('_cv')} fitted on this data set by subject-grouped "
                                   f"{min(folds, len(good.subjects))}-fold (never on the tested subject)",
                           **(_free_only(summary) if name.startswith("population_mean") else summary)}
    weights = model.directory / WEIGHTS_FILE
    if weights.is_file():
        from bpstream.training.export import build_net, load_checkpoint
        from bpstream.training.train import predict_net

        ckpt = load_checkpoint(weights)
        if ckpt.get("cnn") is not None:
            cnn, stats = build_net(ckpt, "cnn")
            p = predict_net(cnn, good.x, stats)
            baselines["cnn_without_lstm"] = {
                "what": "same ResNet, global average pooling instead of the LSTM, same training data",
                **_summary(paired_report(p[:, 0], p[:, 1], good.sbp, good.dbp, good.subject, good.t_start))}
        pat_train = meta.training_data.get("pat_regression")
        if isinstance(pat_train, dict):
            coef = (np.asarray(pat_train["sbp"]), np.asarray(pat_train["dbp"]), float(pat_train["sbp_mean"]),
                    float(pat_train["dbp_mean"]))
            s, d = predict_pat(coef, good)
            baselines["pat_regression_training"] = {
                "what": "PAT regression fitted on the model's training windows",
                **_summary(paired_report(s, d, good.sbp, good.dbp, good.subject, good.t_start))}
    _ = fit_pat  # fitted inside cross_validated

    for sec, (s_est, d_est) in {"calibration_free": (pred[:, 0], pred[:, 1])}.items():
        plot_pair(s_est, good.sbp, f"{kind}: SBP, {sec} (model {meta.version})", out / f"sbp_{sec}.png")
        plot_pair(d_est, good.dbp, f"{kind}: DBP, {sec} (model {meta.version})", out / f"dbp_{sec}.png")
    from bpstream.training.metrics import calibrate

    cal_s, _, keep_c = calibrate(pred[:, 0], good.sbp, good.subject, good.t_start)
    cal_d, _, _ = calibrate(pred[:, 1], good.dbp, good.subject, good.t_start)
    if keep_c.any():
        plot_pair(cal_s[keep_c], good.sbp[keep_c], f"{kind}: SBP, calibrated", out / "sbp_calibrated.png")
        plot_pair(cal_d[keep_c], good.dbp[keep_c], f"{kind}: DBP, calibrated", out / "dbp_calibrated.png")

    details: dict[str, Any] = {
        "data": {"kind": kind, "windows_total": n_total, "windows_flagged_poor_quality": int(flagged.sum()),
                 "windows_scored": len(good), "subjects": len(good.subjects),
                 "inputs": {k: int(v) for k, v in zip(*np.unique(good.inputs, return_counts=True), strict=True)},
                 **{k: v for k, v in ws.info.items() if k in ("kind", "source")}},
        "model": {"version": meta.version, "parameters": meta.parameters,
                  "flops_per_window": meta.flops_per_window, "runtime": "torchscript", "device": model.device},
        "model_metrics": _summary(metrics),
        "ppg_only": _summary(ppg_only),
        "baselines": baselines,
        "stages": stage_confusion(pred[:, 0], pred[:, 1], good.sbp, good.dbp),
        "anomaly_head": _anomaly_head(pred[:, 4], good),
    }
    if all_ws.fault.any():
        details["sqi_vs_simulator_faults"] = {
            "fault_windows": int(all_ws.fault.sum()),
            "flagged_given_fault": float((~all_ws.quality_ok[all_ws.fault]).mean()),
            "flagged_given_clean": float((~all_ws.quality_ok[~all_ws.fault]).mean())}
    if kind == "simulated":
        # Poor windows stay in the sequence as quality_ok=False, exactly as the live service receives them.
        full = _model_predict(model, np.where(all_ws.quality_ok[:, None, None], all_ws.x, 0.0).astype(np.float32))
        details["alerts_on_model_estimates"] = alert_evaluation(all_ws, full[:, 0], full[:, 1],
                                                                np.maximum(full[:, 2], full[:, 3]))
        details["alerts_on_true_pressure"] = alert_evaluation(all_ws, all_ws.sbp, all_ws.dbp,
                                                              np.full(len(all_ws), 3.0))
    if kind == "mimic3" and finetune and weights.is_file() and len(good.subjects) >= 8:
        details["finetuned_on_other_records"] = _summary(_finetune_mimic(good, weights, log))
    details["verdict"] = _verdict(metrics, baselines)
    (out / "details.json").write_text(json.dumps(details, indent=2, default=_json_default))
    (out / "REPORT.md").write_text(_markdown(kind, metrics, details))
    log(f"[{kind}] {details['verdict']}")
    log(f"[{kind}] wrote {out / 'metrics.json'}, details.json, REPORT.md and plots")
    return {"metrics": metrics, "details": details}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def _anomaly_head(prob: np.ndarray, ws: WindowSet) -> dict[str, Any]:
    y = ws.anomaly.astype(bool)
    p = prob >= 0.5
    return {"positives": int(y.sum()), "sensitivity": float((p & y).sum() / y.sum()) if y.any() else None,
            "specificity": float((~p & ~y).sum() / (~y).sum()) if (~y).any() else None,
            "label": "reference SBP >= 140 or DBP >= 90 or SBP < 90"}


def _verdict(metrics: dict[str, Any], baselines: dict[str, Any]) -> str:
    parts = []
    m_s, m_d = metrics["calibration_free"]["sbp"]["mae"], metrics["calibration_free"]["dbp"]["mae"]
    for name in ("population_mean_cv", "population_mean_training"):
        if name in baselines:
            b_s = baselines[name]["calibration_free.sbp"]["mae"]
            b_d = baselines[name]["calibration_free.dbp"]["mae"]
            beats = m_s < b_s and m_d < b_d
            parts.append(f"calibration-free MAE {m_s:.1f}/{m_d:.1f} vs {name} {b_s:.1f}/{b_d:.1f}: "
                         + ("beats it" if beats else "does NOT beat it (nothing useful learnt for this data)"))
            break
    cf = baselines.get("calibration_carried_forward", {})
    c_s, c_d = metrics["calibrated"]["sbp"]["mae"], metrics["calibrated"]["dbp"]["mae"]
    if cf and c_s is not None and cf["calibrated.sbp"]["mae"] is not None:
        b_s, b_d = cf["calibrated.sbp"]["mae"], cf["calibrated.dbp"]["mae"]
        beats = c_s < b_s and c_d < b_d
        parts.append(f"calibrated MAE {c_s:.1f}/{c_d:.1f} vs carried-forward {b_s:.1f}/{b_d:.1f}: "
                     + ("beats it" if beats else "does NOT beat it"))
    return "; ".join(parts)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if not math.isnan(v) else "nan"
    return str(v)


def _markdown(kind: str, metrics: dict[str, Any], details: dict[str, Any]) -> str:
    lines = [f"# Evaluation on {kind}", "", f"Model {details['model']['version']}; "
             f"{details['data']['windows_scored']} windows scored of {details['data']['windows_total']} "
             f"({details['data']['windows_flagged_poor_quality']} flagged poor quality), "
             f"{details['data']['subjects']} subjects.", "", f"**Verdict:** {details['verdict']}", "",
             "| what | section | BP | MAE | RMSE | ME | SD | BHS | AAMI | n |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, summary: dict[str, Any]) -> None:
        for key, m in summary.items():
            if not isinstance(m, dict) or "mae" not in m:
                continue
            sec, bp = key.split(".")
            lines.append(f"| {name} | {sec} | {bp.upper()} | {_fmt(m['mae'])} | {_fmt(m['rmse'])} | "
                         f"{_fmt(m['me'])} | {_fmt(m['sd'])} | {_fmt(m['bhs_grade'])} | {_fmt(m['aami_pass'])} | "
                         f"{m['n']} |")

    row("ResNet-LSTM", details["model_metrics"])
    row("ResNet-LSTM, PPG only", details["ppg_only"])
    for name, b in details["baselines"].items():
        row(name, b)
    if "finetuned_on_other_records" in details:
        row("ResNet-LSTM fine-tuned on other records", details["finetuned_on_other_records"])
    st = details["stages"]
    lines += ["", "Stage confusion (rows reference, columns estimate): " + ", ".join(st["labels"]), "```"]
    lines += [" ".join(f"{v:6d}" for v in r) for r in st["matrix"]]
    lines += ["```", f"Hypertension (stage 1+) sensitivity {_fmt(st['hypertension_sensitivity'])}, "
              f"specificity {_fmt(st['hypertension_specificity'])}."]
    for key in ("alerts_on_model_estimates", "alerts_on_true_pressure"):
        if key in details:
            a = details[key]
            lines.append(f"\n{key}: crisis sensitivity {_fmt(a['crisis_sensitivity'])} "
                         f"({a['crisis_detected']}/{a['crisis_episodes']}), false crisis alerts per patient-day "
                         f"{_fmt(a['false_crisis_alerts_per_patient_day'])}, median delay "
                         f"{_fmt(a['median_detection_delay_s'])} s, raised by kind {a['raised_by_kind']}")
    return "\n".join(lines) + "\n"


def evaluate_folders(data: Sequence[Path], report: Path, model: Path | None, folds: int = 5, hop_s: float = 2.0,
                     finetune: bool = True, log: Log = print, seeds: tuple[int, ...] = (0, 1, 2),
                     ) -> dict[str, Any]:
    """Evaluate each data folder; one folder writes into ``report``, several into ``report/<kind>``."""
    from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir
    from bpstream.training.study import StudyConfig, external_evaluation, run_study

    results = {}
    for path in data:
        kind, ws = detect_and_load(path, hop_s=hop_s, progress=True)
        out = report if len(data) == 1 else report / kind
        # The cross-validation trains its own networks; every other evaluation scores an exported model.
        model_dir = None if kind == "cinc2015" else latest_model_dir(model or DEFAULT_MODELS_ROOT)
        if kind == "cinc2015":
            # The product model's own training data: what is measured is the recipe, by record-grouped CV.
            results[kind] = run_study(ws, out, StudyConfig(folds=folds, seeds=seeds), log=log)
        elif kind == "mimic3":
            # Records the committed model never saw: an external test of it, with the study's metrics.
            assert model_dir is not None
            results[kind] = external_evaluation(ws, model_dir, out, StudyConfig(folds=folds), log=log)
        else:
            assert model_dir is not None
            results[kind] = evaluate_windows(ws, kind, model_dir, out, folds, finetune, log)
    return results
