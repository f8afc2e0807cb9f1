"""The ResNet-LSTM: 1-D residual blocks over ``(2, 1000)`` ECG+PPG windows, an LSTM over the feature sequence.

``output = LSTM(ResNet(input))``: the residual stack (batch-normalised 1-D convolutions, stride 2 at each
stage) turns 8 s at 125 Hz into a sequence of 32 feature vectors (one every 0.25 s, each seeing a little
over one heartbeat); the LSTM integrates them over the window; heads give SBP, DBP (in standardised units),
their log-variances (trained with a Gaussian NLL, so ``exp(logvar/2)`` is the model's own uncertainty) and an
anomaly logit (window pressure outside the normal-to-stage-1 range).

``use_lstm=False`` gives the "CNN without LSTM" baseline (global average pooling instead), so the evaluation
can show what the recurrent part adds. :class:`Deployable` wraps a trained network into the exported form:
input ``(B, 2, 1000)`` float32, output ``(B, 5)`` = sbp, dbp, sbp_sd, dbp_sd (mmHg) and anomaly probability.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from bpstream.shared.modelspec import MODEL_CHANNELS, WINDOW_SAMPLES

_PPG = MODEL_CHANNELS.index("ppg")
OUTPUT_NAMES = ("sbp", "dbp", "sbp_sd", "dbp_sd", "anomaly_prob")


@dataclass(slots=True, frozen=True)
class NetworkConfig:
    """Architecture hyper-parameters (recorded in the artefact metadata)."""

    in_channels: int = len(MODEL_CHANNELS)
    stem_channels: int = 16
    stage_channels: tuple[int, ...] = (16, 32, 48, 64)
    #: Max-pool by 2 after the stem: halves the cost of every stage (8 ms per sample step is plenty).
    stem_pool: bool = True
    kernel_size: int = 5
    lstm_hidden: int = 64
    use_lstm: bool = True
    dropout: float = 0.1
    #: Add the PPG's first and second derivatives (each z-scored per window) as input channels, computed inside
    #: the network so the window contract stays ``(B, 2, 1000)``: the morphology real pulses carry is in them.
    ppg_derivatives: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stage_channels"] = list(self.stage_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkConfig:
        d = dict(d)
        if "stage_channels" in d:
            d["stage_channels"] = tuple(d["stage_channels"])
        return cls(**d)


@dataclass(slots=True)
class TargetStats:
    """Population mean and SD of the training targets: the network predicts standardised pressures."""

    sbp_mean: float = 125.0
    sbp_std: float = 20.0
    dbp_mean: float = 75.0
    dbp_std: float = 12.0
    extra: dict[str, float] = field(default_factory=dict)


class ResidualBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus a (projected when the shape changes) skip connection, then ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=pad, bias=False)
        self.bn1 = nn.BatchNorm1d(c_out)
        self.conv2 = nn.Conv1d(c_out, c_out, kernel, padding=pad, bias=False)
        self.bn2 = nn.BatchNorm1d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv1d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm1d(c_out))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        out: torch.Tensor = self.act(y + self.skip(x))
        return out


class BpNet(nn.Module):
    """The ResNet-LSTM. ``forward`` returns ``(B, 5)``: z_sbp, z_dbp, logvar_sbp, logvar_dbp, anomaly_logit."""

    def __init__(self, config: NetworkConfig | None = None) -> None:
        super().__init__()
        cfg = config or NetworkConfig()
        self.config = cfg
        self.ppg_derivatives = cfg.ppg_derivatives
        self.ppg_index = _PPG
        stem_in = cfg.in_channels + (2 if cfg.ppg_derivatives else 0)
        self.stem = nn.Sequential(
            nn.Conv1d(stem_in, cfg.stem_channels, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm1d(cfg.stem_channels), nn.ReLU(inplace=True),
            *([nn.MaxPool1d(2)] if cfg.stem_pool else []))
        blocks: list[nn.Module] = []
        c = cfg.stem_channels
        for i, c_out in enumerate(cfg.stage_channels):
            blocks.append(ResidualBlock1d(c, c_out, cfg.kernel_size, stride=1 if i == 0 else 2))
            c = c_out
        self.resnet = nn.Sequential(*blocks)
        self.features = c
        self.lstm: nn.LSTM | None = nn.LSTM(c, cfg.lstm_hidden, batch_first=True) if cfg.use_lstm else None
        head_in = cfg.lstm_hidden + c if cfg.use_lstm else c
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(head_in, 64), nn.ReLU(inplace=True),
                                  nn.Linear(64, 5))

    def sequence_length(self, n: int = WINDOW_SAMPLES) -> int:
        n = (n + 2 * 3 - 7) // 2 + 1
        if self.config.stem_pool:
            n //= 2
        for i in range(len(self.config.stage_channels)):
            if i > 0:
                n = (n + 2 * (self.config.kernel_size // 2) - self.config.kernel_size) // 2 + 1
        return n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ppg_derivatives:
            x = torch.cat([x, _derivatives(x[:, self.ppg_index:self.ppg_index + 1])], dim=1)
        feats = self.resnet(self.stem(x))  # (B, C, T)
        pooled = feats.mean(dim=2)
        if self.lstm is not None:
            seq, _ = self.lstm(feats.transpose(1, 2))  # (B, T, H)
            pooled = torch.cat([seq[:, -1, :], pooled], dim=1)
        out: torch.Tensor = self.head(pooled)
        return out


def _zscore(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean(dim=2, keepdim=True)) / (x.std(dim=2, keepdim=True) + 1e-6)


def _derivatives(ppg: torch.Tensor) -> torch.Tensor:
    """First and second differences of ``(B, 1, T)``, padded back to ``T`` and z-scored per window."""
    d1 = nn.functional.pad(ppg[:, :, 1:] - ppg[:, :, :-1], (1, 0), mode="replicate")
    d2 = nn.functional.pad(d1[:, :, 1:] - d1[:, :, :-1], (1, 0), mode="replicate")
    return torch.cat([_zscore(d1), _zscore(d2)], dim=1)


class Deployable(nn.Module):
    """A trained :class:`BpNet` in exported form: mmHg pressures, SDs and a probability, ``(B, 5)``."""

    def __init__(self, net: BpNet, stats: TargetStats) -> None:
        super().__init__()
        self.net = net
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor([stats.sbp_mean, stats.dbp_mean], dtype=torch.float32))
        self.register_buffer("std", torch.tensor([stats.sbp_std, stats.dbp_std], dtype=torch.float32))
        # Shrinkage towards the training mean, fitted on held-out records (1 = none): a network whose deviations
        # from the mean carry only part of the truth should move only part of the way.
        self.shrink: torch.Tensor
        self.register_buffer("shrink", torch.tensor([stats.extra.get("shrink_sbp", 1.0),
                                                     stats.extra.get("shrink_dbp", 1.0)], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = self.net(x)
        bp = raw[:, 0:2] * self.std * self.shrink + self.mean
        sd = torch.exp(0.5 * raw[:, 2:4].clamp(-10.0, 10.0)) * self.std
        prob = torch.sigmoid(raw[:, 4:5])
        return torch.cat([bp, sd, prob], dim=1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(net: BpNet, n: int = WINDOW_SAMPLES) -> dict[str, int]:
    """FLOPs per window (1 multiply-add = 2 FLOPs): convolutions and linears measured by FlopCounterMode,
    the LSTM added analytically (FlopCounterMode does not see it): per step, 4 gates of
    ``(input + hidden) x hidden`` multiply-adds plus the gate nonlinearities and the cell update."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, net.config.in_channels, n))
    net.train(was_training)
    measured = int(counter.get_total_flops())
    lstm = 0
    if net.lstm is not None:
        t, i, h = net.sequence_length(n), net.lstm.input_size, net.lstm.hidden_size
        # 2 FLOPs per MAC for W_ih x + W_hh h, plus biases (2 per gate unit), plus ~ 10 elementwise ops per unit
        lstm = t * (2 * 4 * h * (i + h) + 2 * 4 * h + 10 * h)
    return {"counted_by_torch": measured, "lstm_analytic": lstm, "total": measured + lstm}
