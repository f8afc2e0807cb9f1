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

Alerts only where the evidence holds (estimates v2 carry their calibration mode, interval and withheld reason):

* a *withheld* estimate (poor signal, out of the training distribution, interval too wide, stale calibration)
  is never alerted on; a stale calibration raises ``calibration_due`` (info) until a fresh one is in use;
* ``stage2`` needs calibrated estimates whose smoothed 90% interval lies in the stage (lower bound at or above
  the threshold), or calibrated estimates whose smoothed value stayed in the stage for ``stage_persistence``
  windows; ``deviation`` needs calibrated estimates; a change of calibration restarts smoothing and baseline;
* ``crisis`` (and ``hypotension``) may be raised on uncalibrated estimates; a crisis raised so also raises
  ``cuff_confirmation`` (info), which the next cuff reading resolves;
* cuff readings (:meth:`AlertDetector.cuff`): one in crisis range raises ``crisis`` at once; one outside it
  resolves an active crisis (contradicted) and raises ``stage2`` instead when it lies in stage 2 (downgrade);
  one below stage 2 resolves an active ``stage2``. For a while after a contradicting reading
  (``cuff_hold_s``) estimates not calibrated on it cannot raise a crisis again;
  a crisis a cuff reading raised or confirmed is resolved only by estimates calibrated on that reading (or a
  later one), so a re-calibration cannot flap it;
* every alert names its evidence: ``basis`` (estimates or cuff), ``mode``, first window, and the calibration
  (cuff time and id) or the cuff reading it rests on.
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
CALIBRATION_DUE: Final = "calibration_due"
CUFF_CONFIRMATION: Final = "cuff_confirmation"
CALIBRATED: Final = "calibrated"
STALE: Final = "calibration_stale"
#: Two-sided 90% normal quantile: an estimate without an interval gets ``value +/- Z90 * sd``.
Z90: Final = 1.6448536
#: A kind cannot be raised while one of these is active: one episode, one alert (a crisis is also stage 2
#: and a deviation, but the clinician gets one crisis alert).
SUPPRESSED_BY: Final[dict[str, tuple[str, ...]]] = {"stage2": ("crisis",), "deviation": ("crisis", "hypotension")}
SEVERITY: Final[dict[str, str]] = {"crisis": "critical", "stage2": "warning", "deviation": "warning",
                                   "hypotension": "warning", CALIBRATION_DUE: "info", CUFF_CONFIRMATION: "info"}
#: Kinds that freeze the patient's baseline while pending or active (acute changes, not chronic state).
_ACUTE: Final = ("crisis", "deviation", "hypotension")
_STATE_VERSION: Final = 1


def _alert_id(s: PatientState, kind: str, started_ns: int) -> str:
    """Stable id of an episode: clinic, device, kind and first window (device ids are unique per clinic only)."""
    return f"{s.clinic_id}/{s.device_id}:{kind}:{started_ns}"


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


class CuffLike(Protocol):
    """What the detector reads from a cuff reading (``bpstream.shared.messages.CuffReading``)."""

    @property
    def clinic_id(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def sbp(self) -> float: ...
    @property
    def dbp(self) -> float: ...
    @property
    def time_ns(self) -> int: ...
    @property
    def cuff_id(self) -> str: ...


@dataclass(slots=True, frozen=True)
class Reading:
    """A minimal estimate for offline evaluation (same fields the detector reads from ``Estimate``).

    Evaluation runs on calibrated (or oracle) values, so the mode defaults to calibrated; without interval
    bounds the detector uses ``value +/- Z90 * sd``.
    """

    clinic_id: str
    device_id: str
    window_end_ns: int
    sbp: float
    dbp: float
    sbp_sd: float = 5.0
    dbp_sd: float = 3.0
    quality_ok: bool = True
    mode: str = CALIBRATED
    withheld: str | None = None
    sbp_lo: float | None = None
    dbp_lo: float | None = None
    calibration_ns: int | None = None
    calibration_cuff_id: str | None = None


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
    #: Calibrated windows with the smoothed value in stage 2 that raise stage2 even when the interval does not
    #: lie wholly in the stage (persistence as evidence; 150 windows = 5 min at a 2 s hop).
    stage_persistence: int = 150
    #: After a cuff reading contradicted a crisis, estimates not calibrated on it cannot raise one for this long.
    cuff_hold_s: float = 300.0
    #: An estimate whose window ends more than this after its receipt time (``received_ns``, when the newest
    #: chunk of its window reached Kafka) is ignored and counted (``future_windows``): windows only move
    #: forward, so one future-dated estimate would otherwise make every later one "old" and freeze the patient.
    max_ahead_s: float = 300.0


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
    # Evidence (added with estimates v2; defaults keep older saved states readable).
    recent_sbp_lo: list[float] = msgspec.field(default_factory=list)
    recent_dbp_lo: list[float] = msgspec.field(default_factory=list)
    mode: str = ""
    calibration_ns: int | None = None
    calibration_cuff_id: str | None = None
    stage_run: int = 0
    withheld_windows: dict[str, int] = msgspec.field(default_factory=dict)
    last_cuff_ns: int = -1
    hold_until_ns: int = -1
    hold_cuff_ns: int = -1
    #: Estimates ignored because their window lay too far ahead of their receipt time.
    future_windows: int = 0
    #: Time of the crisis-range cuff reading that raised or confirmed the active crisis (-1: none). Only
    #: estimates calibrated on it (or a later reading) may resolve that crisis.
    crisis_cuff_ns: int = -1


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
        after a restart raises nothing twice. An estimate dated more than ``max_ahead_s`` after its receipt
        time is ignored (counted in ``future_windows``) and never moves the patient's clock.
        """
        cfg, s = self.config, self.state
        end_ns = int(est.window_end_ns)
        received_ns = int(getattr(est, "received_ns", 0) or 0)
        ahead_ns = cfg.max_ahead_s * 1e9
        if received_ns > 0 and end_ns - received_ns > ahead_ns:
            s.future_windows += 1
            return []
        if end_ns <= s.last_ns:
            return []
        withheld: str | None = getattr(est, "withheld", None)
        mode: str = getattr(est, "mode", CALIBRATED)
        calibration_ns: int | None = getattr(est, "calibration_ns", None)
        events: list[Alert] = []
        if est.device_id:
            s.clinic_id, s.device_id = est.clinic_id, est.device_id
        due = s.episodes.setdefault(CALIBRATION_DUE, _Episode())
        if withheld == STALE and not due.active:
            due.active, due.started_ns, due.n_windows = True, end_ns, 1
            events.append(self._info(CALIBRATION_DUE, "raised", end_ns, est.sbp, est.dbp,
                                     "calibration due: the cuff calibration expired; take a cuff reading"))
        elif (due.active and withheld != STALE and est.quality_ok and mode == CALIBRATED
              and calibration_ns != s.calibration_ns):
            events.append(self._info(CALIBRATION_DUE, "resolved", end_ns, est.sbp, est.dbp,
                                     "calibration due resolved: a new calibration is in use"))
            due.active = False
        sd = max(float(est.sbp_sd), float(est.dbp_sd))
        sbp, dbp = float(est.sbp), float(est.dbp)
        if (not est.quality_ok or withheld is not None
                or not (math.isfinite(sbp) and math.isfinite(dbp) and math.isfinite(sd)) or sd > cfg.max_sd_mmhg):
            s.ignored_windows += 1
            if withheld is not None:
                s.withheld_windows[withheld] = s.withheld_windows.get(withheld, 0) + 1
            return events
        if (mode, calibration_ns) != (s.mode, s.calibration_ns):
            # A new calibration (or none) changes what the numbers mean: restart smoothing and the baseline.
            for buf in (s.recent_sbp, s.recent_dbp, s.recent_sd, s.recent_sbp_lo, s.recent_dbp_lo,
                        s.history_sbp, s.history_dbp):
                buf.clear()
            s.stage_run = 0
            for kind, ep in s.episodes.items():
                if kind in KINDS:
                    ep.pending = 0
            s.mode, s.calibration_ns = mode, calibration_ns
            s.calibration_cuff_id = getattr(est, "calibration_cuff_id", None)
        sbp_lo = getattr(est, "sbp_lo", None)
        dbp_lo = getattr(est, "dbp_lo", None)
        sbp_lo = sbp - Z90 * float(est.sbp_sd) if sbp_lo is None else float(sbp_lo)
        dbp_lo = dbp - Z90 * float(est.dbp_sd) if dbp_lo is None else float(dbp_lo)
        if s.last_ns >= 0 and end_ns - s.last_ns > cfg.max_gap_s * 1e9:
            s.recent_sbp.clear()
            s.recent_dbp.clear()
            s.recent_sd.clear()
            s.recent_sbp_lo.clear()
            s.recent_dbp_lo.clear()
            s.stage_run = 0
            for ep in s.episodes.values():
                ep.pending = 0
                ep.calm = 0
        s.last_ns = end_ns
        for buf, value in ((s.recent_sbp, sbp), (s.recent_dbp, dbp), (s.recent_sd, sd), (s.recent_sbp_lo, sbp_lo),
                           (s.recent_dbp_lo, dbp_lo)):
            buf.append(value)
            del buf[: -cfg.smoothing_windows]
        s.good_windows += 1
        smooth_sbp = float(np.median(s.recent_sbp))
        smooth_dbp = float(np.median(s.recent_dbp))
        in_stage = smooth_sbp >= cfg.stage2_sbp or smooth_dbp >= cfg.stage2_dbp
        s.stage_run = s.stage_run + 1 if (in_stage and mode == CALIBRATED) else 0
        lows = (float(np.median(s.recent_sbp_lo)), float(np.median(s.recent_dbp_lo)))
        # SD of a median of k values is about 1.25 sd / sqrt(k).
        smooth_sd = max(1.0, 1.25 * float(np.median(s.recent_sd)) / math.sqrt(len(s.recent_sd)))
        base = self.baseline

        for kind in KINDS:
            raise_margin, calm = self._condition(kind, smooth_sbp, smooth_dbp, base)
            raise_margin = self._evidence(kind, raise_margin, mode, lows, end_ns)
            if kind == "crisis" and s.crisis_cuff_ns >= 0 and (
                    mode != CALIBRATED or (calibration_ns or -1) < s.crisis_cuff_ns):
                # Estimates that do not know the crisis cuff reading cannot resolve its crisis: without this a
                # re-calibration flaps it (raised by the cuff, resolved by the old calibration, raised again).
                calm = False
            event = self._step(kind, raise_margin, calm, end_ns, smooth_sbp, smooth_dbp, smooth_sd, base)
            if event is not None:
                events.append(event)
                if kind == "crisis" and event.state == "raised" and mode != CALIBRATED:
                    ask = s.episodes.setdefault(CUFF_CONFIRMATION, _Episode())
                    if not ask.active:
                        ask.active, ask.started_ns = True, end_ns
                        events.append(self._info(
                            CUFF_CONFIRMATION, "raised", end_ns, smooth_sbp, smooth_dbp,
                            "crisis raised on uncalibrated estimates: confirm with a cuff reading"))

        busy = any((e.active or e.pending > 0) for k, e in s.episodes.items() if k in _ACUTE)
        if not busy and s.good_windows % cfg.baseline_every == 0:
            s.history_sbp.append(smooth_sbp)
            s.history_dbp.append(smooth_dbp)
            del s.history_sbp[: -cfg.baseline_size]
            del s.history_dbp[: -cfg.baseline_size]
        return events

    def _evidence(self, kind: str, margin: float | None, mode: str, lows: tuple[float, float],
                  end_ns: int) -> float | None:
        """The raise margin where the evidence holds for ``kind``, else None (see the module docstring)."""
        c, s = self.config, self.state
        if margin is None:
            return None
        if kind == "stage2":
            if mode != CALIBRATED:
                return None
            interval_margin = max(lows[0] - c.stage2_sbp, lows[1] - c.stage2_dbp)
            if interval_margin >= 0.0:
                return margin
            return margin if s.stage_run >= c.stage_persistence else None
        if kind == "deviation" and mode != CALIBRATED:
            return None
        if kind == "crisis" and end_ns <= s.hold_until_ns and (
                mode != CALIBRATED or (s.calibration_ns or -1) < s.hold_cuff_ns):
            return None  # a cuff reading just contradicted a crisis; these estimates do not know it yet
        return margin

    def _info(self, kind: str, state: str, event_ns: int, sbp: float, dbp: float, message: str, *,
              basis: str = "estimates", cuff_id: str | None = None) -> Alert:
        s = self.state
        ep = s.episodes.setdefault(kind, _Episode())
        return Alert(alert_id=_alert_id(s, kind, ep.started_ns), clinic_id=s.clinic_id, device_id=s.device_id,
                     kind=kind, severity=SEVERITY[kind], state=state, started_ns=ep.started_ns, event_ns=event_ns,
                     sbp=round(float(sbp), 1), dbp=round(float(dbp), 1), confidence=1.0, message=message,
                     basis=basis, mode=s.mode, calibration_ns=s.calibration_ns,
                     calibration_cuff_id=s.calibration_cuff_id, cuff_id=cuff_id)

    def cuff(self, reading: CuffLike, *, raise_alerts: bool = True) -> list[Alert]:
        """Take a cuff reading for this patient; return the alerts it raises, confirms away or resolves.

        Readings at or before the last one seen are ignored (replays). With ``raise_alerts`` false the
        reading is only remembered (a backlog read at start that is too old to act on).
        """
        c, s = self.config, self.state
        t = int(reading.time_ns)
        if t <= s.last_cuff_ns:
            return []
        s.last_cuff_ns = t
        s.clinic_id, s.device_id = reading.clinic_id, reading.device_id
        if not raise_alerts:
            return []
        sbp, dbp, cid = float(reading.sbp), float(reading.dbp), reading.cuff_id
        events: list[Alert] = []
        ask = s.episodes.get(CUFF_CONFIRMATION)
        if ask is not None and ask.active:
            events.append(self._info(CUFF_CONFIRMATION, "resolved", t, sbp, dbp,
                                     f"cuff reading {sbp:.0f}/{dbp:.0f} mmHg received", basis="cuff", cuff_id=cid))
            ask.active = False
        category = bp_category(sbp, dbp)
        crisis = s.episodes.setdefault("crisis", _Episode())
        stage2 = s.episodes.setdefault("stage2", _Episode())
        if category == "crisis":
            s.crisis_cuff_ns = t
            if not crisis.active:
                crisis.active, crisis.started_ns, crisis.n_windows, crisis.calm, crisis.pending = True, t, 0, 0, 0
                events.append(self._info("crisis", "raised", t, sbp, dbp,
                                         f"hypertensive crisis on a cuff reading: {sbp:.0f}/{dbp:.0f} mmHg",
                                         basis="cuff", cuff_id=cid))
            return events
        if crisis.active:
            events.append(self._info("crisis", "resolved", t, sbp, dbp,
                                     f"crisis contradicted by a cuff reading: {sbp:.0f}/{dbp:.0f} mmHg",
                                     basis="cuff", cuff_id=cid))
            crisis.active, crisis.calm, crisis.n_windows, crisis.pending = False, 0, 0, 0
            s.crisis_cuff_ns = -1
            s.hold_until_ns, s.hold_cuff_ns = t + round(c.cuff_hold_s * 1e9), t
            if category == "stage2" and not stage2.active:
                stage2.active, stage2.started_ns, stage2.n_windows, stage2.calm, stage2.pending = True, t, 0, 0, 0
                events.append(self._info("stage2", "raised", t, sbp, dbp,
                                         f"stage 2 hypertension on a cuff reading (crisis downgraded): "
                                         f"{sbp:.0f}/{dbp:.0f} mmHg", basis="cuff", cuff_id=cid))
            return events
        if stage2.active and category != "stage2":
            events.append(self._info("stage2", "resolved", t, sbp, dbp,
                                     f"stage 2 contradicted by a cuff reading: {sbp:.0f}/{dbp:.0f} mmHg",
                                     basis="cuff", cuff_id=cid))
            stage2.active, stage2.calm, stage2.n_windows, stage2.pending = False, 0, 0, 0
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
            alert_id=_alert_id(s, kind, ep.started_ns), clinic_id=s.clinic_id, device_id=s.device_id,
            kind=kind, severity=SEVERITY[kind], state=state, started_ns=ep.started_ns, event_ns=end_ns,
            sbp=round(sbp, 1), dbp=round(dbp, 1),
            baseline_sbp=None if base is None else round(base[0], 1),
            baseline_dbp=None if base is None else round(base[1], 1),
            n_windows=ep.n_windows, confidence=round(conf, 3), message=msg, mode=s.mode,
            first_window_ns=ep.started_ns, calibration_ns=s.calibration_ns, calibration_cuff_id=s.calibration_cuff_id)
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
        if kind == "crisis":
            s.crisis_cuff_ns = -1
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
