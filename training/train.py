"""Training of the ResNet-LSTM (and of the CNN-only baseline) on preprocessed windows.

Loss: mean squared error of the standardised SBP/DBP, plus a Gaussian negative log-likelihood that trains the
log-variance heads (with the mean detached, so uncertainty learning cannot pull the estimates), plus a small
binary cross-entropy for the anomaly logit, plus a within-subject term: half of each batch is paired with
another window of the same subject and the error of the predicted pressure change is penalised (this is what
per-patient calibration relies on). AdamW, learning rate 1e-3, batch 32 (as in the reference paper), up to 100
epochs, early stopping on the subject-disjoint validation MAE, the best epoch's weights restored. Training
windows are augmented (circular time shift common to both channels, so the ECG-to-PPG timing is kept; gain per
channel; light noise) and ECG is dropped (zeroed) for a share of them so that PPG-only inputs work.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.modelspec import HOP_SECONDS
from bpstream.training.data import WindowSet
from bpstream.training.splits import assert_disjoint, split_subjects


@dataclass(slots=True)
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 100
    patience: int = 6
    seed: int = 0
    ecg_dropout: float = 0.3
    #: Decoupled weight decay (AdamW).
    weight_decay: float = 1e-2
    anomaly_weight: float = 0.2
    #: Stop after this many minutes even before early stopping (None: no limit).
    max_minutes: float | None = None
    device: str = "auto"
    progress: bool = True
    #: Limit the batches per epoch (tests); None means the whole training set.
    max_batches: int | None = None
    #: Augment training windows: a random circular time shift (the same for both channels, so the ECG-to-PPG
    #: timing that carries the pressure is kept), a random gain per channel and a little white noise.
    augment: bool = True
    #: Weight of the within-subject loss: half of each batch is paired with another window of the same subject
    #: and the error of the predicted pressure CHANGE between the two is penalised (what calibration needs).
    pair_weight: float = 1.0
    #: Real-monitor augmentations on top of ``augment`` (each a no-op at 0): time-warp (fraction of the heart
    #: rate, per batch), ECG-to-PPG delay jitter (s), baseline wander amplitude (SDs), PPG low-pass jitter
    #: (the widest moving-average kernel, samples).
    time_warp: float = 0.0
    delay_jitter_s: float = 0.0
    wander: float = 0.0
    lowpass_max: int = 0
    #: "mse" or "huber" (delta 1 SD: robust to the label outliers an arterial line leaves).
    loss: str = "mse"


@dataclass(slots=True)
class TrainResult:
    net: Any  # BpNet with the best weights, in eval mode, on the CPU
    stats: Any  # TargetStats
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_mae: float = float("nan")
    seconds: float = 0.0
    device: str = "cpu"
    stopped: str = ""


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def predict_net(net: Any, x: np.ndarray, stats: Any, device: str = "cpu", batch: int = 512) -> np.ndarray:
    """Eager predictions of a BpNet in mmHg: ``(N, 5)`` = sbp, dbp, sbp_sd, dbp_sd, anomaly_prob."""
    import torch

    from bpstream.shared.model.network import Deployable

    model = Deployable(net, stats).to(device).eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])).to(device)).float().cpu())
    return torch.cat(outs).numpy() if outs else np.zeros((0, 5), dtype=np.float32)


def train_model(train: WindowSet, val: WindowSet, net_config: Any = None, cfg: TrainConfig | None = None,
                init: Any = None, stats: Any = None) -> TrainResult:
    """Train (or fine-tune ``init``) on ``train``; early-stop on ``val``. Subjects must be disjoint."""
    import torch
    from torch import nn

    from bpstream.shared.model.network import BpNet, NetworkConfig, TargetStats

    cfg = cfg or TrainConfig()
    assert_disjoint(train.subject, val.subject)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = resolve_device(cfg.device)
    if stats is None:
        stats = TargetStats(sbp_mean=float(train.sbp.mean()), sbp_std=float(max(train.sbp.std(), 1.0)),
                            dbp_mean=float(train.dbp.mean()), dbp_std=float(max(train.dbp.std(), 1.0)))
    net = copy.deepcopy(init) if init is not None else BpNet(net_config or NetworkConfig())
    net = net.to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(2, cfg.patience // 3))
    mean = torch.tensor([stats.sbp_mean, stats.dbp_mean], device=device)
    std = torch.tensor([stats.sbp_std, stats.dbp_std], device=device)
    x_all = torch.from_numpy(train.x)
    y_all = torch.from_numpy(np.stack([train.sbp, train.dbp], axis=1))
    a_all = torch.from_numpy(train.anomaly)
    bce = nn.BCEWithLogitsLoss()
    n = len(train)
    n_batches = math.ceil(n / cfg.batch_size)
    if cfg.max_batches is not None:
        n_batches = min(n_batches, cfg.max_batches)
    result = TrainResult(net=net, stats=stats, device=device)
    best_state: dict[str, Any] | None = None
    best, bad_epochs = float("inf"), 0
    t_start = time.perf_counter()

    epochs: Any = range(1, cfg.max_epochs + 1)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(epochs, desc="epochs", unit="epoch")
        epochs = bar
    partners = _subject_partners(train.subject)
    width = x_all.shape[-1]
    ramp = torch.arange(width, device=device)
    for epoch in epochs:
        net.train()
        perm = torch.from_numpy(rng.permutation(n))
        total, seen = 0.0, 0
        batches: Any = range(n_batches)
        if cfg.progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch}", unit="batch", leave=False)
        for b in batches:
            idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            n_pairs = 0
            if cfg.pair_weight > 0:
                n_pairs = len(idx) // 2
                anchors = idx[:n_pairs]
                idx = torch.cat([anchors, torch.from_numpy(partners(anchors.numpy(), rng))])
            xb = x_all[idx].to(device)
            if cfg.augment:
                shift = torch.randint(0, width, (len(idx), 1, 1), device=device)
                xb = xb.gather(2, ((ramp + shift) % width).expand(-1, xb.shape[1], -1))
                gain = torch.exp(torch.empty(len(idx), xb.shape[1], 1, device=device).uniform_(-0.2, 0.2))
                xb = xb * gain + 0.05 * torch.randn_like(xb)
                xb = _monitor_augment(xb, cfg, ramp)
            if cfg.ecg_dropout > 0:
                drop = torch.rand(len(idx), device=device) < cfg.ecg_dropout
                xb[:, 0][drop] = 0.0
            yb = (y_all[idx].to(device) - mean) / std
            ab = a_all[idx].to(device)
            out = net(xb)
            mu, logvar = out[:, 0:2], out[:, 2:4].clamp(-10, 10)
            point_loss = nn.functional.huber_loss if cfg.loss == "huber" else nn.functional.mse_loss
            mse = point_loss(mu, yb)
            if n_pairs:
                delta_err = (mu[:n_pairs] - mu[n_pairs:]) - (yb[:n_pairs] - yb[n_pairs:])
                mse = mse + cfg.pair_weight * point_loss(delta_err, torch.zeros_like(delta_err))
            nll = 0.5 * (logvar + (mu.detach() - yb) ** 2 * torch.exp(-logvar)).mean()
            loss = mse + nll + cfg.anomaly_weight * bce(out[:, 4], ab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
            if cfg.progress and hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{total / seen:.3f}")
        net.eval()
        pred = predict_net(net, val.x, stats, device) if len(val) else np.zeros((0, 5))
        val_mae = float((np.abs(pred[:, 0] - val.sbp).mean() + np.abs(pred[:, 1] - val.dbp).mean()) / 2) \
            if len(val) else total / max(seen, 1)
        elapsed = time.perf_counter() - t_start
        result.history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_mae": val_mae,
                               "lr": opt.param_groups[0]["lr"], "seconds": elapsed})
        sched.step(val_mae)
        if bar is not None:
            bar.set_postfix(loss=f"{total / max(seen, 1):.3f}", val_mae=f"{val_mae:.2f}",
                            best=f"{min(best, val_mae):.2f}")
        if val_mae < best - 1e-3:
            best, bad_epochs, result.best_epoch = val_mae, 0, epoch
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad_epochs += 1
        if bad_epochs >= cfg.patience:
            result.stopped = f"early stopping: no validation improvement for {cfg.patience} epochs"
            break
        if cfg.max_minutes is not None and elapsed > cfg.max_minutes * 60:
            result.stopped = f"time budget of {cfg.max_minutes} min reached"
            break
    else:
        result.stopped = f"max_epochs={cfg.max_epochs} reached"
    if bar is not None:
        bar.close()
    if best_state is not None:
        net.load_state_dict(best_state)
    result.net = net.cpu().eval()
    result.best_val_mae = best
    result.seconds = time.perf_counter() - t_start
    return result


def _monitor_augment(xb: Any, cfg: TrainConfig, ramp: Any) -> Any:
    """What differs between real monitors and patients but not with pressure: heart-rate time-warp, the
    monitor's ECG-to-PPG delay, baseline wander and the PPG front end's low-pass cut-off."""
    import torch
    from torch.nn import functional

    b, c, width = xb.shape
    device = xb.device
    if cfg.time_warp > 0:
        scale = 1.0 + float(np.random.uniform(-cfg.time_warp, cfg.time_warp))
        n = max(8, round(width * scale))
        warped = functional.interpolate(xb, size=n, mode="linear", align_corners=False)
        xb = warped[:, :, :width] if n >= width else functional.pad(warped, (0, width - n), mode="circular")
    ppg = 1
    if cfg.delay_jitter_s > 0:
        k = round(cfg.delay_jitter_s * 125.0)
        shift = torch.randint(-k, k + 1, (b, 1), device=device)
        moved = xb[:, ppg].gather(1, (ramp + shift) % width)
        xb = torch.cat([xb[:, :ppg], moved[:, None], xb[:, ppg + 1:]], dim=1)
    if cfg.wander > 0:
        t = ramp.float()[None, None, :] / 125.0
        f = torch.empty(b, c, 1, device=device).uniform_(0.05, 0.5)
        phase = torch.empty(b, c, 1, device=device).uniform_(0, 6.2832)
        amp = torch.empty(b, c, 1, device=device).uniform_(0, cfg.wander)
        xb = xb + amp * torch.sin(6.2832 * f * t + phase)
    if cfg.lowpass_max > 1:
        k = int(np.random.randint(1, cfg.lowpass_max + 1))
        if k > 1:
            kernel = torch.full((1, 1, k), 1.0 / k, device=device)
            smooth = functional.conv1d(functional.pad(xb[:, ppg:ppg + 1], (k // 2, k - 1 - k // 2),
                                                      mode="replicate"), kernel)
            xb = torch.cat([xb[:, :ppg], smooth, xb[:, ppg + 1:]], dim=1)
    return xb


def _subject_partners(subject: np.ndarray) -> Any:
    """A function drawing, for each given window index, a random window of the same subject."""
    codes, inverse = np.unique(subject, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(codes) + 1))

    def draw(idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = inverse[idx]
        lo, hi = starts[g], starts[g + 1]
        return np.asarray(order[lo + (rng.random(idx.size) * (hi - lo)).astype(np.int64)], dtype=np.int64)

    return draw


@dataclass(slots=True)
class RunSpec:
    """What ``bpstream train`` trains on and how long it may take."""

    data: Path | None = None
    n_subjects: int = 900
    minutes: float = 4.0
    data_seed: int = 0
    hop_s: float = 10.0
    val_fraction: float = 0.15
    budget_minutes: float = 12.0
    cnn_share: float = 0.25
    train_cnn: bool = True
    lstm_hidden: int = 64
    dropout: float = 0.1
    #: Where simulated training windows are cached between runs (None: no cache).
    cache_dir: Path | None = Path(".local/cache")
    train: TrainConfig = field(default_factory=TrainConfig)


def _simulated_windows(spec: RunSpec, progress: bool) -> tuple[WindowSet, dict[str, Any]]:
    """Simulate and window the training cohort, cached in ``spec.cache_dir`` (same inputs, same arrays: the
    simulator is deterministic per seed, so the cache key is the spec plus the code versions)."""
    from bpstream.shared.preprocessing import PREPROCESSING_VERSION
    from bpstream.simulators.cohort import GENERATOR_VERSION
    from bpstream.training.data import windows_from_sim

    key = f"{spec.n_subjects}-{spec.minutes:g}-{spec.data_seed}-{spec.hop_s:g}-{GENERATOR_VERSION}-" \
          f"{PREPROCESSING_VERSION}"
    key = "".join(c if c.isalnum() or c in ".-" else "_" for c in key)
    cache = None if spec.cache_dir is None else Path(spec.cache_dir) / f"windows-{key}.npz"
    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta_json")))
        return WindowSet(**arrays), meta
    from bpstream.simulators.dataset import simulate_cohort

    ds = simulate_cohort(spec.n_subjects, spec.minutes, spec.data_seed)
    ws = windows_from_sim(ds.records, spec.hop_s, ds.label_names, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, meta_json=json.dumps(ds.meta, default=str), **{
            f: getattr(ws, f) for f in ("x", "sbp", "dbp", "subject", "t_start", "quality_ok", "sqi", "inputs",
                                        "fault", "pat", "hr")})
        tmp.replace(cache)
    return ws, dict(ds.meta)


def load_training_windows(spec: RunSpec, progress: bool = True) -> tuple[WindowSet, dict[str, Any]]:
    """Simulate (or load) the training cohort and window it; poor-quality windows are excluded."""
    from bpstream.training.data import detect_and_load

    if spec.data is not None:
        kind, ws = detect_and_load(spec.data, hop_s=spec.hop_s, progress=progress)
        desc: dict[str, Any] = {"source": str(spec.data), "kind": kind, "meta": ws.info.get("meta")}
    else:
        ws, meta = _simulated_windows(spec, progress)
        desc = {"source": "simulate_cohort", "n_subjects": spec.n_subjects, "minutes": spec.minutes,
                "seed": spec.data_seed, "scenarios": "training", "meta": meta}
    n_all = len(ws)
    ws = ws.subset(ws.quality_ok)
    desc.update(hop_s=spec.hop_s, n_windows_total=n_all, n_windows_quality_ok=len(ws),
                n_subjects=len(ws.subjects))
    return ws, desc


def run_training(spec: RunSpec, out_dir: Path, log: Any = print) -> Path:
    """``bpstream train``: data, subject-disjoint split, ResNet-LSTM, CNN baseline, checkpoint. Returns the
    run folder (``out_dir/<version>``) holding ``checkpoint.pt`` and ``train_report.json``."""
    import torch

    from bpstream.shared.model.network import NetworkConfig, count_flops, count_parameters
    from bpstream.training.metrics import paired_report

    t0 = time.perf_counter()
    ws, desc = load_training_windows(spec, progress=spec.train.progress)
    log(f"data: {desc['n_windows_quality_ok']} good windows of {desc['n_windows_total']} from "
        f"{desc['n_subjects']} subjects in {time.perf_counter() - t0:.0f} s")
    tr_idx, va_idx = split_subjects(ws.subject, spec.val_fraction, seed=spec.train.seed)
    train, val = ws.subset(tr_idx), ws.subset(va_idx)
    assert_disjoint(train.subject, val.subject)
    fingerprint = ws.fingerprint()
    remaining = max(1.0, spec.budget_minutes - (time.perf_counter() - t0) / 60)
    lstm_minutes = remaining * (1 - spec.cnn_share) if spec.train_cnn else remaining
    cfg = copy.copy(spec.train)
    cfg.max_minutes = lstm_minutes
    net_cfg = NetworkConfig(lstm_hidden=spec.lstm_hidden, dropout=spec.dropout)
    log(f"training ResNet-LSTM on {len(train)} windows / {len(train.subjects)} subjects, validating on "
        f"{len(val)} windows / {len(val.subjects)} other subjects (budget {lstm_minutes:.1f} min)")
    res = train_model(train, val, net_cfg, cfg)
    log(f"ResNet-LSTM: best val MAE {res.best_val_mae:.2f} mmHg at epoch {res.best_epoch} "
        f"({res.stopped}; {res.seconds:.0f} s on {res.device})")
    cnn_res = None
    if spec.train_cnn:
        cnn_cfg = copy.copy(spec.train)
        cnn_cfg.max_minutes = max(0.5, spec.budget_minutes - (time.perf_counter() - t0) / 60)
        log(f"training CNN-without-LSTM baseline (budget {cnn_cfg.max_minutes:.1f} min)")
        cnn_res = train_model(train, val, NetworkConfig(use_lstm=False, dropout=spec.dropout), cnn_cfg, stats=res.stats)
        log(f"CNN baseline: best val MAE {cnn_res.best_val_mae:.2f} mmHg at epoch {cnn_res.best_epoch}")
    from bpstream.training.baselines import fit_pat

    coef_s, coef_d, mean_s, mean_d = fit_pat(train)
    pat_regression = None if coef_s is None or coef_d is None else {
        "features": "1, 1/PAT (s), HR (bpm)", "sbp": coef_s.tolist(), "dbp": coef_d.tolist(),
        "sbp_mean": mean_s, "dbp_mean": mean_d}
    pred = predict_net(res.net, val.x, res.stats)
    val_metrics = paired_report(pred[:, 0], pred[:, 1], val.sbp, val.dbp, val.subject, val.t_start)
    version = datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + f"-{fingerprint[:6]}"
    run = Path(out_dir) / version
    run.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "version": version, "net_config": res.net.config.to_dict(), "state_dict": res.net.state_dict(),
        "stats": asdict(res.stats),
        "cnn": None if cnn_res is None else {"net_config": cnn_res.net.config.to_dict(),
                                              "state_dict": cnn_res.net.state_dict()},
    }
    torch.save(checkpoint, run / "checkpoint.pt")
    report = {
        "version": version, "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_data": {**desc, "fingerprint": fingerprint, "pat_regression": pat_regression,
                          "train_subjects": len(train.subjects),
                          "val_subjects": len(val.subjects), "train_windows": len(train),
                          "val_windows": len(val)},
        "training": {**{k: v for k, v in asdict(spec.train).items() if k != "progress"},
                     "device": res.device, "best_epoch": res.best_epoch, "epochs_run": len(res.history),
                     "stopped": res.stopped, "seconds": round(res.seconds, 1),
                     "total_seconds": round(time.perf_counter() - t0, 1), "history": res.history,
                     "cnn_best_val_mae": None if cnn_res is None else cnn_res.best_val_mae,
                     "cnn_epochs_run": None if cnn_res is None else len(cnn_res.history),
                     "window_hop_s_train": spec.hop_s, "stream_hop_s": HOP_SECONDS},
        "validation_metrics": {"split": "subject-disjoint validation subjects of the training cohort",
                               **val_metrics},
        "parameters": count_parameters(res.net), "flops_per_window": count_flops(res.net),
    }
    (run / "train_report.json").write_text(json.dumps(report, indent=2, default=float))
    log(f"saved {run}")
    return run
