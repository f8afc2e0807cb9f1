"""Per-patient hypertension alert logic, shared by training-time evaluation and the live alerting service.

:class:`AlertDetector` consumes one patient's estimates in window order and returns the ``Alert`` messages
(``bpstream.shared.messages``) it raises or resolves. It is pure (no I/O, no clock): the same sequence of
estimates always gives the same alerts, so the alerting service can persist its state (``to_bytes`` /
``from_bytes``) and replay Kafka without duplicating alerts (alert ids are derived from the device, the kind
and the episode's first window).

What it does, and why:

* poor-quality windows (``quality_ok`` false) and very uncertain estimates are ignored: never silently scored;
* estimates are smoothed with a running median of the last few good windows, so one bad estimate cannot alert;
* events are the Kafka ``Alert`` messages themselves; the ACC/AHA category (normal / elevated / stage1 /
  stage2 / crisis) is not a field of the alert, it is ``bp_category(alert.sbp, alert.dbp)``;
* the patient's own baseline is the median of a long, sub-sampled history (robust to outliers); it is frozen
  while an acute episode is pending or active, so an episode never drags the baseline along with it;
* a condition must hold for ``persistence`` consecutive good windows before an alert is raised, and its
  resolve condition (thresholds minus a hysteresis margin) must hold for ``resolve_windows`` windows before
  it is resolved: exactly one raise and one resolve per episode, no storms;
* kinds: ``crisis`` (SBP > 180 and/or DBP > 120, critical), ``stage2`` (sustained stage-2 hypertension),
  ``deviation`` (far from the patient's own baseline), ``hypotension`` (SBP < 90); an active crisis suppresses
  new stage2 and deviation alerts (and hypotension new deviation alerts), so one episode gives one alert.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec
import numpy as np

from bpstream.shared.errors import DecodeError
from bpstream.shared.messages import Alert

CATEGORIES: Final = ("normal", "elevated", "stage1", "stage2", "crisis")
#: Evaluated in this order, so a higher-priority kind raised in the same window suppresses lower ones.
KINDS: Final = ("crisis", "hypotension", "stage2", "deviation")
#: A kind cannot be raised while one of these is active: one episode, one alert (a crisis is also stage 2
#: and a deviation, but the clinician gets one crisis alert).
SUPPRESSED_BY: Final[dict[str, tuple[str, ...]]] = {"stage2": ("crisis",), "deviation": ("crisis", "hypotension")}
SEVERITY: Final[dict[str, str]] = {"crisis": "critical", "stage2": "warning", "deviation": "warning",
                                   "hypotension": "warning"}
#: Kinds that freeze the patient's baseline while pending or active (acute changes, not chronic state).
_ACUTE: Final = ("crisis", "deviation", "hypotension")
_STATE_VERSION: Final = 1


def bp_category(sbp: float, dbp: float) -> str:
    """ACC/AHA 2017 category of one reading (crisis: SBP > 180 and/or DBP > 120)."""
    if sbp > 180.0 or dbp > 120.0:
        return "crisis"
    if sbp >= 140.0 or dbp >= 90.0:
        return "stage2"
    if sbp >= 130.0 or dbp >= 80.0:
        return "stage1"
    if sbp >= 120.0:
        return "elevated"
    return "normal"


class EstimateLike(Protocol):
    """What the detector reads from an estimate (``bpstream.shared.messages.Estimate`` satisfies it)."""

    @property
    def clinic_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def window_end_ns(self) -> int: ...
    @property
    def sbp(self) -> float: ...
    @property
    def dbp(self) -> float: ...
    @property
    def sbp_sd(self) -> float: ...
    @property
    def dbp_sd(self) -> float: ...
    @property
    def quality_ok(self) -> bool: ...


@dataclass(slots=True, frozen=True)
class Reading:
    """A minimal estimate for offline evaluation (same fields the detector reads from ``Estimate``)."""

    clinic_id: str
    device_id: str
    window_end_ns: int
    sbp: float
    dbp: float
    sbp_sd: float = 5.0
    dbp_sd: float = 3.0
    quality_ok: bool = True


class AlertConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Thresholds and timing of the detector. Defaults suit 8 s windows every 2 s."""

    smoothing_windows: int = 5
    persistence: int = 5
    resolve_windows: int = 10
    crisis_sbp: float = 180.0
    crisis_dbp: float = 120.0
    stage2_sbp: float = 140.0
    stage2_dbp: float = 90.0
    hypotension_sbp: float = 90.0
    #: Resolve only once the smoothed value is this far back on the safe side of the raise threshold.
    hysteresis_sbp: float = 10.0
    hysteresis_dbp: float = 5.0
    deviation_sbp: float = 25.0
    deviation_dbp: float = 15.0
    #: Every n-th good window enters the baseline history, which keeps ``baseline_size`` values.
    baseline_every: int = 5
    baseline_size: int = 360
    #: Good windows needed before the baseline (and so deviation alerts) is trusted.
    baseline_min: int = 30
    #: Estimates whose SD exceeds this are treated as poor quality.
    max_sd_mmhg: float = 25.0
    #: A silence longer than this restarts smoothing and persistence counters (not active episodes).
    max_gap_s: float = 60.0


class _Episode(msgspec.Struct):
    """One kind's state machine: counting up to a raise, active, counting down to a resolve."""

    pending: int = 0
    pending_since_ns: int = 0
    active: bool = False
    started_ns: int = 0
    n_windows: int = 0
    calm: int = 0


class PatientState(msgspec.Struct):
    """Everything the detector remembers about one patient; serialisable with msgspec."""

    v: int = _STATE_VERSION
    clinic_id: str = ""
    device_id: str = ""
    last_ns: int = -1
    recent_sbp: list[float] = msgspec.field(default_factory=list)
    recent_dbp: list[float] = msgspec.field(default_factory=list)
    recent_sd: list[float] = msgspec.field(default_factory=list)
    history_sbp: list[float] = msgspec.field(default_factory=list)
    history_dbp: list[float] = msgspec.field(default_factory=list)
    good_windows: int = 0
    ignored_windows: int = 0
    episodes: dict[str, _Episode] = msgspec.field(default_factory=dict)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PatientState)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


@dataclass(slots=True)
class AlertDetector:
    """Alert state machine of ONE patient. Feed it that patient's estimates with :meth:`update`."""

    config: AlertConfig = field(default_factory=AlertConfig)
    state: PatientState = field(default_factory=PatientState)

    # ---- persistence -------------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return _encoder.encode(self.state)

    @classmethod
    def from_bytes(cls, data: bytes, config: AlertConfig | None = None) -> AlertDetector:
        """Restore a detector; raises ``DecodeError`` for bytes that are not a saved state."""
        try:
            state = _decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise DecodeError(f"invalid alert detector state: {exc}", reason="bad_state") from exc
        if state.v != _STATE_VERSION:
            raise DecodeError(f"alert detector state version {state.v} is not supported", reason="bad_version")
        return cls(config=config or AlertConfig(), state=state)

    # ---- views ---------------------------------------------------------------------------------------------
    @property
    def baseline(self) -> tuple[float, float] | None:
        """The patient's robust baseline (median SBP, median DBP), or None until enough good windows."""
        s = self.state
        if s.good_windows < self.config.baseline_min or not s.history_sbp:
            return None
        return float(np.median(s.history_sbp)), float(np.median(s.history_dbp))

    @property
    def active(self) -> tuple[str, ...]:
        """Kinds with an active (raised, unresolved) episode."""
        return tuple(k for k, e in self.state.episodes.items() if e.active)

    # ---- the update ----------------------------------------------------------------------------------------
    def update(self, est: EstimateLike) -> list[Alert]:
        """Take the next estimate of this patient; return the alerts it raises or resolves (usually none).

        Estimates at or before the last one seen (replays, reordering) are ignored, so replaying a partition
        after a restart raises nothing twice.
        """
        cfg, s = self.config, self.state
        end_ns = int(est.window_end_ns)
        if end_ns <= s.last_ns:
            return []
        sd = max(float(est.sbp_sd), float(est.dbp_sd))
        sbp, dbp = float(est.sbp), float(est.dbp)
        if (not est.quality_ok or not (math.isfinite(sbp) and math.isfinite(dbp) and math.isfinite(sd))
                or sd > cfg.max_sd_mmhg):
            s.ignored_windows += 1
            return []
        s.clinic_id, s.device_id = est.clinic_id, est.device_id
        if s.last_ns >= 0 and end_ns - s.last_ns > cfg.max_gap_s * 1e9:
            s.recent_sbp.clear()
            s.recent_dbp.clear()
            s.recent_sd.clear()
            for ep in s.episodes.values():
                ep.pending = 0
                ep.calm = 0
        s.last_ns = end_ns
        for buf, value in ((s.recent_sbp, sbp), (s.recent_dbp, dbp), (s.recent_sd, sd)):
            buf.append(value)
            del buf[: -cfg.smoothing_windows]
        s.good_windows += 1
        smooth_sbp = float(np.median(s.recent_sbp))
        smooth_dbp = float(np.median(s.recent_dbp))
        # SD of a median of k values is about 1.25 sd / sqrt(k).
        smooth_sd = max(1.0, 1.25 * float(np.median(s.recent_sd)) / math.sqrt(len(s.recent_sd)))
        base = self.baseline

        events: list[Alert] = []
        for kind in KINDS:
            raise_margin, calm = self._condition(kind, smooth_sbp, smooth_dbp, base)
            event = self._step(kind, raise_margin, calm, end_ns, smooth_sbp, smooth_dbp, smooth_sd, base)
            if event is not None:
                events.append(event)

        busy = any((e.active or e.pending > 0) for k, e in s.episodes.items() if k in _ACUTE)
        if not busy and s.good_windows % cfg.baseline_every == 0:
            s.history_sbp.append(smooth_sbp)
            s.history_dbp.append(smooth_dbp)
            del s.history_sbp[: -cfg.baseline_size]
            del s.history_dbp[: -cfg.baseline_size]
        return events

    def _condition(self, kind: str, sbp: float, dbp: float, base: tuple[float, float] | None,
                   ) -> tuple[float | None, bool]:
        """(margin by which the raise condition holds in mmHg, or None if it does not; resolve condition)."""
        c = self.config
        margins: list[float] = []
        if kind == "crisis":
            margins = [sbp - c.crisis_sbp, dbp - c.crisis_dbp]
            calm = sbp < c.crisis_sbp - c.hysteresis_sbp and dbp < c.crisis_dbp - c.hysteresis_dbp
        elif kind == "stage2":
            margins = [sbp - c.stage2_sbp, dbp - c.stage2_dbp]
            calm = sbp < c.stage2_sbp - c.hysteresis_sbp and dbp < c.stage2_dbp - c.hysteresis_dbp
        elif kind == "hypotension":
            margins = [c.hypotension_sbp - sbp]
            calm = sbp > c.hypotension_sbp + c.hysteresis_sbp
        else:
            if base is None:
                return None, True
            margins = [abs(sbp - base[0]) - c.deviation_sbp, abs(dbp - base[1]) - c.deviation_dbp]
            calm = abs(sbp - base[0]) < c.deviation_sbp / 2 and abs(dbp - base[1]) < c.deviation_dbp / 2
        best = max(margins)
        # Strict thresholds: crisis is "> 180"; stage 2 is ">= 140", so a margin of exactly 0 counts there.
        holds = best >= 0.0 if kind == "stage2" else best > 0.0
        return (best if holds else None), calm

    def _step(self, kind: str, margin: float | None, calm: bool, end_ns: int, sbp: float, dbp: float,
              sd: float, base: tuple[float, float] | None) -> Alert | None:
        c, s = self.config, self.state
        ep = s.episodes.setdefault(kind, _Episode())
        # Numbers are rounded here, not by consumers, so the alert on the wire is what the detector returns.
        make: Callable[[str, float, str], Alert] = lambda state, conf, msg: Alert(  # noqa: E731
            alert_id=f"{s.device_id}:{kind}:{ep.started_ns}", clinic_id=s.clinic_id, device_id=s.device_id,
            kind=kind, severity=SEVERITY[kind], state=state, started_ns=ep.started_ns, event_ns=end_ns,
            sbp=round(sbp, 1), dbp=round(dbp, 1),
            baseline_sbp=None if base is None else round(base[0], 1),
            baseline_dbp=None if base is None else round(base[1], 1),
            n_windows=ep.n_windows, confidence=round(conf, 3), message=msg)
        if not ep.active:
            suppressed = any(s.episodes.get(k, _Episode()).active for k in SUPPRESSED_BY.get(kind, ()))
            if margin is None or suppressed:
                ep.pending = 0
                return None
            if ep.pending == 0:
                ep.pending_since_ns = end_ns
            ep.pending += 1
            if ep.pending < c.persistence:
                return None
            ep.active, ep.started_ns, ep.n_windows, ep.calm, ep.pending = True, ep.pending_since_ns, ep.pending, 0, 0
            return make("raised", _phi(margin / sd), self._describe(kind, sbp, dbp, base, ep.n_windows))
        ep.n_windows += 1
        ep.calm = ep.calm + 1 if calm else 0
        if ep.calm < c.resolve_windows:
            return None
        event = make("resolved", 1.0 - _phi((margin or 0.0) / sd),
                     f"{kind} resolved: smoothed {sbp:.0f}/{dbp:.0f} mmHg for {ep.calm} windows")
        ep.active, ep.calm, ep.n_windows = False, 0, 0
        return event

    def _describe(self, kind: str, sbp: float, dbp: float, base: tuple[float, float] | None, n: int) -> str:
        reading = f"smoothed {sbp:.0f}/{dbp:.0f} mmHg over {n} consecutive good windows"
        if kind == "crisis":
            return f"hypertensive crisis (>180 and/or >120): {reading}"
        if kind == "stage2":
            return f"stage 2 hypertension (>=140 and/or >=90): {reading}"
        if kind == "hypotension":
            return f"hypotension (SBP <90): {reading}"
        assert base is not None
        return (f"deviation from own baseline {base[0]:.0f}/{base[1]:.0f} mmHg "
                f"({sbp - base[0]:+.0f}/{dbp - base[1]:+.0f}): {reading}")
