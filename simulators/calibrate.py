"""Calibration against reality: the same feature extractors run on the MIMIC-III windows and on simulated
windows, and the distributions are compared in a table (markdown) and a figure (PNG).

Features per 60 s window: heart rate (neurokit2 R peaks), ECG QRS peak-to-peak amplitude, PPG rise time
(foot to peak) and half-amplitude pulse width relative to RR, beat-to-beat PPG amplitude variation, ECG
high-frequency noise (>40 Hz) and baseline wander (<0.5 Hz) as fractions of power, and pulse arrival time
(R peak to PPG maximum upslope). The bedside monitor delays the real pleth channel (median ~0.55 s), so PAT is
compared through its changes: within-window PAT SD after removing the window median, and the within-window
slope of PAT against beat SBP (ABP for real records, ground truth for simulated ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from bpstream.simulators.errors import DataFormatError
from bpstream.simulators.realdata import fill_short_gaps, list_mimic, mimic_dir, read_mimic_csv

FS = 125.0
FEATURES: dict[str, tuple[str, str]] = {
    "hr_bpm": ("heart rate", "bpm"),
    "ecg_qrs_pp_mv": ("ECG QRS peak-to-peak", "mV"),
    "ppg_rise_s": ("PPG rise time (foot to peak)", "s"),
    "ppg_width_rr": ("PPG width at half amplitude / RR", ""),
    "ppg_amp_cv": ("PPG beat amplitude CV", ""),
    "ecg_hf_frac": ("ECG power > 40 Hz (fraction)", ""),
    "ecg_lf_frac": ("ECG power < 0.5 Hz (fraction)", ""),
    "pat_abs_s": ("R to PPG max upslope (absolute)", "s"),
    "pat_sd_ms": ("within-window PAT SD (changes)", "ms"),
    "pat_sbp_slope": ("within-window dPAT/dSBP", "ms/mmHg"),
}


@dataclass(slots=True)
class WindowFeatures:
    values: dict[str, float]


def window_features(ecg: np.ndarray, ppg: np.ndarray, beat_sbp_at: np.ndarray | None,
                    sbp_times: np.ndarray | None) -> dict[str, float]:
    """Features of one window. ``beat_sbp_at``/``sbp_times``: SBP values and the times they belong to."""
    import neurokit2 as nk

    out = {k: float("nan") for k in FEATURES}
    ecg = np.nan_to_num(fill_short_gaps(ecg, 60), nan=float(np.nanmedian(ecg)))
    ppg = np.nan_to_num(fill_short_gaps(ppg, 60), nan=float(np.nanmedian(ppg)))
    try:
        _, info = nk.ecg_peaks(nk.ecg_clean(ecg, sampling_rate=FS), sampling_rate=FS)
    except Exception:  # neurokit2 raises plain exceptions on unusable signals
        return out
    r = np.asarray(info["ECG_R_Peaks"], dtype=int)
    if len(r) < 10:
        return out
    rr = np.diff(r) / FS
    out["hr_bpm"] = float(60 / np.median(rr))
    pp = [np.ptp(ecg[max(0, i - 6):i + 7]) for i in r]
    out["ecg_qrs_pp_mv"] = float(np.median(pp))
    f, pw = signal.welch(ecg - ecg.mean(), fs=FS, nperseg=1024)
    total = pw.sum()
    out["ecg_hf_frac"] = float(pw[f > 40].sum() / total)
    out["ecg_lf_frac"] = float(pw[f < 0.5].sum() / total)
    # PPG beats: feet (minima) and peaks from a 0.5-8 Hz band-passed copy
    b, a = signal.butter(2, [0.5, 8], btype="band", fs=FS)
    pf = signal.filtfilt(b, a, ppg)
    slope = np.gradient(pf) * FS
    med_rr = float(np.median(rr))
    peaks, _ = signal.find_peaks(pf, distance=int(0.6 * med_rr * FS), prominence=0.3 * np.std(pf))
    rises, widths, amps = [], [], []
    for pk in peaks[1:]:
        lo = max(0, pk - int(0.6 * med_rr * FS))
        foot = lo + int(np.argmin(pf[lo:pk]))
        amp = pf[pk] - pf[foot]
        if amp <= 0:
            continue
        rises.append((pk - foot) / FS)
        amps.append(amp)
        half = pf[foot] + amp / 2
        left = foot + int(np.argmax(pf[foot:pk] >= half))
        right_seg = pf[pk:pk + int(med_rr * FS)] < half
        if right_seg.any():
            widths.append((pk + int(np.argmax(right_seg)) - left) / FS / med_rr)
    if len(rises) >= 5:
        out["ppg_rise_s"] = float(np.median(rises))
        out["ppg_amp_cv"] = float(np.std(amps) / np.mean(amps))
    if len(widths) >= 5:
        out["ppg_width_rr"] = float(np.median(widths))
    ups, _ = signal.find_peaks(slope, distance=int(0.6 * med_rr * FS), prominence=0.3 * np.std(slope))
    pat = []
    for i in r:
        after = ups[ups > i + int(0.08 * FS)]
        pat.append((after[0] - i) / FS if after.size and after[0] - i < 1.2 * FS else np.nan)
    pat_arr = np.array(pat)
    if np.isfinite(pat_arr).sum() >= 10:
        out["pat_abs_s"] = float(np.nanmedian(pat_arr))
        dev = pat_arr - np.nanmedian(pat_arr)
        dev = dev[np.abs(dev) < 0.15]  # drop beats where the next pulse's upslope was taken
        out["pat_sd_ms"] = float(np.std(dev) * 1000)
        if beat_sbp_at is not None and sbp_times is not None and len(sbp_times) > 5:
            sbp = np.interp(r / FS, sbp_times, beat_sbp_at, left=np.nan, right=np.nan)
            ok = np.isfinite(sbp) & np.isfinite(pat_arr) & (np.abs(pat_arr - np.nanmedian(pat_arr)) < 0.15)
            if ok.sum() >= 10 and np.std(sbp[ok]) > 1.0:
                out["pat_sbp_slope"] = float(np.polyfit(sbp[ok], pat_arr[ok] * 1000, 1)[0])
    return out


def real_features(directory: Path | None = None) -> list[dict[str, float]]:
    from bpstream.simulators.realdata import abp_beats

    files = list_mimic(directory)
    if not files:
        raise DataFormatError(f"no MIMIC windows found in {directory or mimic_dir()} (../shared/data is outside "
                              "the repository; set BPSTREAM_DATA_DIR)")
    rows = []
    for path in files:
        rec = read_mimic_csv(path)
        if rec.gap_fraction > 0.05:
            continue
        bt, sbp, _ = abp_beats(rec.abp, FS)
        rows.append(window_features(rec.ecg, rec.ppg, sbp, bt))
    return rows


def sim_features(subjects: int, seed: int, minutes: float = 3.0) -> list[dict[str, float]]:
    from bpstream.simulators.dataset import simulate_cohort

    ds = simulate_cohort(subjects, minutes, seed, "training")
    rows = []
    win = int(60 * FS)
    for rec in ds.records:
        for k in range(len(rec.ecg) // win):
            a, b = k * win, (k + 1) * win
            sel = (rec.beat_times_s >= k * 60) & (rec.beat_times_s < (k + 1) * 60)
            rows.append(window_features(rec.ecg[a:b].astype(float), rec.ppg[a:b].astype(float),
                                        rec.beat_sbp[sel].astype(float), rec.beat_times_s[sel] - k * 60))
    return rows


def fmt(v: float) -> str:
    return f"{v:.3g}"


def _overlap(x: np.ndarray, y: np.ndarray) -> float:
    """Histogram intersection of two samples (0 = disjoint, 1 = identical) over their common range."""
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    if hi <= lo:
        return 1.0
    bins = np.linspace(lo, hi, 13)
    hx, _ = np.histogram(x, bins)
    hy, _ = np.histogram(y, bins)
    return float(np.minimum(hx / hx.sum(), hy / hy.sum()).sum())


def run_calibration(data: Path | None, out: Path, subjects: int = 40, seed: int = 0) -> str:
    """Write ``out/SIMULATOR_CALIBRATION.md`` and ``out/figures/simulator_calibration.png``; return the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = real_features(data)
    sim = sim_features(subjects, seed)
    lines = ["| feature | real median [p10, p90] (n) | simulated median [p10, p90] (n) | sim inside real p5-p95 | "
             "overlap |", "|---|---|---|---|---|"]
    fig, axes = plt.subplots(2, 5, figsize=(20, 7))
    for ax, (key, (label, unit)) in zip(axes.ravel(), FEATURES.items(), strict=True):
        xr = np.array([r[key] for r in real], dtype=float)
        xs = np.array([r[key] for r in sim], dtype=float)
        xr, xs = xr[np.isfinite(xr)], xs[np.isfinite(xs)]
        if len(xr) < 3 or len(xs) < 3:
            lines.append(f"| {label} ({unit}) | n={len(xr)} | n={len(xs)} | - | - |")
            continue
        p5, p95 = np.percentile(xr, [5, 95])
        inside = float(np.mean((xs >= p5) & (xs <= p95)))
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | {fmt(np.median(xr))} [{fmt(np.percentile(xr, 10))}, "
                     f"{fmt(np.percentile(xr, 90))}] ({len(xr)}) | {fmt(np.median(xs))} [{fmt(np.percentile(xs, 10))}, "
                     f"{fmt(np.percentile(xs, 90))}] ({len(xs)}) | {inside:.0%} | {_overlap(xr, xs):.2f} |")
        bins = np.linspace(min(xr.min(), xs.min()), max(xr.max(), xs.max()), 16)
        ax.hist(xr, bins, alpha=0.55, density=True, label=f"MIMIC-III (n={len(xr)})")
        ax.hist(xs, bins, alpha=0.55, density=True, label=f"simulated (n={len(xs)})")
        ax.set_title(f"{label}" + (f" [{unit}]" if unit else ""), fontsize=9)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Simulator vs real ICU recordings (60 s windows, same feature extractors)")
    fig.tight_layout()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "figures" / "simulator_calibration.png", dpi=90)
    plt.close(fig)
    _plot_examples(out / "figures" / "simulator_examples.png", data)
    table = "\n".join(lines)
    note = ("The real pleth channel is delayed by the monitor (~0.55 s), so the absolute R-to-upslope time is "
            "expected to differ; compare the PAT change rows.")
    (out / "SIMULATOR_CALIBRATION.md").write_text(
        "# Simulator calibration against MIMIC-III windows\n\n"
        f"Produced by `bpstream simulate calibrate --subjects {subjects} --seed {seed}` "
        f"({len(real)} real windows with <5% gaps; {len(sim)} simulated 60 s windows from the `training` mix).\n\n"
        f"{table}\n\n{note}\n\n![calibration](figures/simulator_calibration.png)\n\n"
        "Eight seconds of real and simulated signals:\n\n![examples](figures/simulator_examples.png)\n")
    return table


def _plot_examples(path: Path, data: Path | None) -> None:
    """Eight seconds of two real windows and of several simulated scenarios, ECG and PPG overlaid."""
    import matplotlib.pyplot as plt

    from bpstream.simulators.dataset import simulate_cohort

    names = ["normotensive", "stage2", "crisis", "arrhythmia", "motion", "noisy"]
    ds = simulate_cohort(len(names), 2, seed=1, scenarios=names)
    panels: list[tuple[str, np.ndarray, np.ndarray]] = []
    for f in list_mimic(data)[:2]:
        rec = read_mimic_csv(f)
        panels.append((f"real MIMIC-III {rec.name}", rec.ecg[:1000], rec.ppg[:1000]))
    for sim in ds.records:
        a = int(90 * FS)
        panels.append((f"simulated {sim.profile['scenario']} (SBP {sim.truth_between(90, 98)[0]:.0f})",
                       sim.ecg[a:a + 1000], sim.ppg[a:a + 1000]))
    fig, axes = plt.subplots(len(panels), 1, figsize=(14, 2.0 * len(panels)), sharex=True)
    t = np.arange(1000) / FS
    for ax, (title, ecg, ppg) in zip(axes, panels, strict=True):
        ax.plot(t, ecg, lw=0.8, color="tab:blue")
        ax.set_ylabel("ECG mV", fontsize=8)
        twin = ax.twinx()
        twin.plot(t, ppg, lw=0.8, color="tab:red")
        twin.set_ylabel("PPG", fontsize=8)
        ax.set_title(title, fontsize=9)
    axes[-1].set_xlabel("s")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
