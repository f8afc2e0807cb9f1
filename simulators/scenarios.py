"""Scenarios: what kind of patient and what happens to them, as baseline pressure ranges and episode schedules.

A scenario fixes a patient's baseline blood-pressure category (ACC/AHA 2017: normal <120/<80, elevated
120-129/<80, stage 1 130-139 or 80-89, stage 2 >=140 or >=90, crisis >180 and/or >120) and the episodes that
move pressure, rhythm and signal quality over time. ``build_schedule`` turns a scenario into per-device episode
arrays that the signal engine evaluates vectorised. Every scenario also declares the range its ground-truth
pressures stay in (tests check it on many seeds), and ``LABEL_NAMES`` maps the per-sample label codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bpstream.simulators.errors import InvalidParameterError, UnknownScenarioError

#: Per-sample label codes (the order is the code). Higher ``LABEL_PRIORITY`` wins when several apply.
LABELS: tuple[str, ...] = (
    "normal", "activity", "stress", "crisis", "hypotension", "atrial_fibrillation", "ectopic",
    "motion", "sensor_off", "dropout", "saturation", "noisy",
)
LABEL_CODES: dict[str, int] = {name: code for code, name in enumerate(LABELS)}
LABEL_NAMES: dict[int, str] = dict(enumerate(LABELS))
LABEL_PRIORITY: tuple[str, ...] = (
    "normal", "noisy", "activity", "stress", "hypotension", "crisis", "ectopic", "atrial_fibrillation",
    "saturation", "motion", "dropout", "sensor_off",
)
#: Episode kinds that move pressure (the others only change rhythm or signal quality).
PRESSURE_KINDS = ("activity", "stress", "crisis", "hypotension")
FAULT_KINDS = ("motion", "sensor_off", "dropout", "saturation")


@dataclass(frozen=True, slots=True)
class ScenarioSpec:
    """One scenario: baseline pressure ranges, the truth range it guarantees, and episode rates."""

    name: str
    description: str
    baseline_sbp: tuple[float, float]
    baseline_dbp: tuple[float, float]
    #: Every beat's true SBP/DBP stays inside these (checked by tests on many seeds). Only ``crisis`` may cross
    #: the crisis thresholds (180/120), so a demo clinic has exactly the crisis devices it asked for.
    sbp_limits: tuple[float, float]
    dbp_limits: tuple[float, float]
    activity_per_min: float = 0.12
    stress_per_min: float = 0.08
    crisis: bool = False
    hypotension: bool = False
    af_fraction: float = 0.0
    pvc_prob: float = 0.0
    motion_per_min: float = 0.0
    sensor_off_per_min: float = 0.0
    dropout_per_min: float = 0.0
    saturation_per_min: float = 0.0
    noise_scale: float = 1.0
    noisy: bool = False
    #: Cuff calibration when the fleet enrols its patients (``FleetConfig.enrol``): ``scheduled`` (enrolment
    #: reading, then one every ``recalibrate_every_s``), ``once`` (enrolment only: the calibration goes stale),
    #: ``never`` (no enrolment: the patient stays uncalibrated).
    calibration: str = "scheduled"


_NORMAL_SBP, _NORMAL_DBP = (100.0, 118.0), (62.0, 78.0)
SCENARIOS: dict[str, ScenarioSpec] = {
    s.name: s
    for s in (
        ScenarioSpec("normotensive", "normal pressure (<120/<80) with everyday activity and stress",
                     _NORMAL_SBP, _NORMAL_DBP, (80, 165), (45, 100)),
        ScenarioSpec("elevated", "elevated pressure (120-129/<80)", (120, 129), (66, 78), (95, 172), (50, 105)),
        ScenarioSpec("stage1", "stage 1 hypertension (130-139 or 80-89)", (130, 139), (80, 89), (105, 176),
                     (60, 112)),
        ScenarioSpec("stage2", "stage 2 hypertension (>=140 or >=90)", (142, 158), (90, 100), (115, 179),
                     (65, 118)),
        ScenarioSpec("crisis", "stage 2 patient entering a hypertensive crisis (>180 and/or >120)",
                     (140, 160), (88, 100), (115, 245), (65, 150), activity_per_min=0.0, stress_per_min=0.0,
                     crisis=True),
        ScenarioSpec("hypotension", "normal patient with a hypotensive episode (SBP < 90)", (105, 122),
                     (64, 78), (55, 150), (30, 95), activity_per_min=0.0, stress_per_min=0.0, hypotension=True),
        ScenarioSpec("arrhythmia", "atrial fibrillation episodes and ectopic (premature ventricular) beats",
                     (112, 135), (68, 84), (70, 178), (40, 110), af_fraction=0.5, pvc_prob=0.06),
        ScenarioSpec("motion", "motion artefacts on both channels", _NORMAL_SBP, _NORMAL_DBP, (80, 165), (45, 100),
                     motion_per_min=1.5),
        ScenarioSpec("sensor_off", "PPG sensor and ECG leads coming off, dropouts and saturation",
                     _NORMAL_SBP, _NORMAL_DBP, (80, 165), (45, 100), sensor_off_per_min=0.8,
                     dropout_per_min=0.8, saturation_per_min=0.3),
        # A loose sensor also moves against the skin: the wander, powerline and muscle noise alone are mostly
        # outside the pulse band and filtered away, the motion artefacts are not (so the SQI sees this sensor).
        ScenarioSpec("noisy", "a poorly attached sensor: strong baseline wander, powerline and muscle noise, and "
                     "frequent motion artefacts", (110, 135), (68, 85), (85, 178), (50, 112), motion_per_min=4.0,
                     noise_scale=4.0, noisy=True),
        # Calibration scenarios: normotensive physiology, different cuff plans (see ``calibration``).
        ScenarioSpec("stale_calibration", "normal pressure; enrolled with a cuff reading and never re-calibrated "
                     "(goes stale after the inference's CALIBRATION_MAX_AGE_S)", _NORMAL_SBP, _NORMAL_DBP,
                     (80, 165), (45, 100), calibration="once"),
        ScenarioSpec("missing_enrolment", "normal pressure; never enrolled with a cuff reading (stays uncalibrated)",
                     _NORMAL_SBP, _NORMAL_DBP, (80, 165), (45, 100), calibration="never"),
    )
}
#: Cuff plans a scenario may declare (``ScenarioSpec.calibration``).
CALIBRATION_PLANS: tuple[str, ...] = ("scheduled", "once", "never")
#: Fleet and dataset mixes (names that expand into one scenario per device).
MIXES: dict[str, dict[str, float]] = {
    "mixed": {"normotensive": 0.24, "elevated": 0.14, "stage1": 0.18, "stage2": 0.18, "crisis": 0.05,
              "hypotension": 0.05, "arrhythmia": 0.06, "motion": 0.04, "sensor_off": 0.02, "noisy": 0.04},
    # Training data: every pressure category, some crises and hypotension, a little of every fault.
    "training": {"normotensive": 0.22, "elevated": 0.15, "stage1": 0.2, "stage2": 0.2, "crisis": 0.07,
                 "hypotension": 0.06, "arrhythmia": 0.05, "motion": 0.03, "noisy": 0.02},
    # Alert evaluation (``bpstream demo --scenario evaluation``): the ``mixed`` cohort with crises
    # over-represented (20 % instead of 5 %) so that crisis sensitivity has a denominator.
    "evaluation": {"normotensive": 0.2, "elevated": 0.12, "stage1": 0.16, "stage2": 0.16, "crisis": 0.2,
                   "hypotension": 0.04, "arrhythmia": 0.05, "motion": 0.03, "sensor_off": 0.01, "noisy": 0.03},
}
#: The demo clinic: exactly one crisis device, exactly one noisy sensor, the rest normal or hypertensive.
CLINIC_CYCLE: tuple[str, ...] = ("normotensive", "stage1", "normotensive", "stage2", "elevated", "normotensive",
                                 "stage1", "stage2")
SCENARIO_NAMES: tuple[str, ...] = (*SCENARIOS, *MIXES, "clinic")


def scenario_spec(name: str) -> ScenarioSpec:
    try:
        return SCENARIOS[name]
    except KeyError:
        raise UnknownScenarioError(
            f"unknown scenario {name!r}; known scenarios: {', '.join(SCENARIOS)}; mixes: "
            f"{', '.join((*MIXES, 'clinic'))}") from None


def assign_scenarios(scenario: str | Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """One concrete scenario per device from a scenario name, a mix name, ``clinic``, or a per-device list."""
    if n < 1:
        raise InvalidParameterError(f"need at least one device/subject, got {n}")
    if not isinstance(scenario, str):
        names = list(scenario)
        if len(names) != n:
            raise InvalidParameterError(f"{len(names)} per-device scenarios given for {n} devices")
        for name in names:
            scenario_spec(name)
        return names
    if scenario in SCENARIOS:
        return [scenario] * n
    if scenario in MIXES:
        mix = MIXES[scenario]
        keys = list(mix)
        p = np.array([mix[k] for k in keys])
        return [keys[i] for i in rng.choice(len(keys), size=n, p=p / p.sum())]
    if scenario == "clinic":
        names = [CLINIC_CYCLE[i % len(CLINIC_CYCLE)] for i in range(n)]
        names[0] = "crisis"
        if n > 1:
            names[1] = "noisy"
        return names
    scenario_spec(scenario)  # raises with the list of names
    raise AssertionError("unreachable")


@dataclass(slots=True)
class Schedule:
    """Episodes of every device as padded arrays ``[n_devices, n_episodes]`` (unused slots have kind -1)."""

    kind: np.ndarray  # int16 label code
    start: np.ndarray
    end: np.ndarray
    ramp: np.ndarray
    dsbp: np.ndarray
    ddbp: np.ndarray
    dhr: np.ndarray
    symp: np.ndarray  # sympathetic activation 0..1 (shortens PEP, narrows PPG)
    p1: np.ndarray  # kind-specific parameters (motion frequency, ...)
    p2: np.ndarray


def build_schedule(names: Sequence[str], profiles_sbp: np.ndarray, profiles_dbp: np.ndarray, duration_s: float,
                   rng: np.random.Generator, crisis_onset_s: float | np.ndarray = 30.0,
                   crisis_ramp_s: float = 20.0, crisis_duration_s: float | None = None) -> Schedule:
    """Draw the episodes of each device over ``[0, duration_s)`` from its scenario.

    ``crisis_onset_s`` (one value or one per device) is when a crisis or hypotension episode starts ramping;
    it lasts ``crisis_duration_s`` (default: to the end).
    """
    if not np.isfinite(duration_s) or duration_s <= 0:
        raise InvalidParameterError(f"duration must be positive, got {duration_s}")
    onsets = np.broadcast_to(np.asarray(crisis_onset_s, dtype=float), (len(names),))
    if not np.isfinite(onsets).all() or (onsets < 0).any() or not crisis_ramp_s > 0:
        raise InvalidParameterError("crisis onset must be >= 0 s and its ramp > 0 s")
    if crisis_duration_s is not None and not crisis_duration_s > 0:
        raise InvalidParameterError(f"crisis duration must be positive, got {crisis_duration_s}")
    rows: list[list[tuple[float, ...]]] = []
    for i, name in enumerate(names):
        spec = scenario_spec(name)
        eps: list[tuple[float, ...]] = []

        def poisson(per_min: float, dur: tuple[float, float], kind: str) -> None:
            count = rng.poisson(per_min * duration_s / 60.0) if per_min > 0 else 0
            for _ in range(count):
                length = rng.uniform(*dur)
                start = rng.uniform(-0.3 * length, duration_s)
                eps.append(_episode(kind, start, start + length, rng))  # noqa: B023

        poisson(spec.activity_per_min, (60.0, 200.0), "activity")
        poisson(spec.stress_per_min, (60.0, 240.0), "stress")
        if not eps and spec.activity_per_min + spec.stress_per_min > 0 and duration_s >= 120:
            # every record of two minutes or more moves pressure at least once (models learn changes)
            length = rng.uniform(60.0, 150.0)
            start = rng.uniform(0.0, max(1.0, duration_s - length))
            eps.append(_episode("activity" if rng.random() < 0.5 else "stress", start, start + length, rng))
        if spec.crisis:
            target_s, target_d = rng.uniform(200, 220), rng.uniform(121, 132)
            end = onsets[i] + crisis_duration_s if crisis_duration_s else 1e9
            eps.append((LABEL_CODES["crisis"], onsets[i], end, crisis_ramp_s, target_s - profiles_sbp[i],
                        target_d - profiles_dbp[i], rng.uniform(5, 15), 0.6, 0.0, 0.0))
        if spec.hypotension:
            target_s, target_d = rng.uniform(70, 80), rng.uniform(40, 48)
            end = onsets[i] + crisis_duration_s if crisis_duration_s else 1e9
            eps.append((LABEL_CODES["hypotension"], onsets[i], end, crisis_ramp_s, target_s - profiles_sbp[i],
                        target_d - profiles_dbp[i], rng.uniform(15, 30), 0.3, 0.0, 0.0))
        if spec.af_fraction > 0:
            # alternate sinus and AF blocks of 30-120 s, starting in sinus rhythm
            t = rng.uniform(5, 40)
            while t < duration_s:
                length = rng.uniform(30, 120)
                eps.append(_episode("atrial_fibrillation", t, t + length, rng))
                t += length + rng.uniform(30, 120)
        poisson(spec.motion_per_min, (3.0, 15.0), "motion")
        poisson(spec.sensor_off_per_min, (3.0, 20.0), "sensor_off")
        poisson(spec.dropout_per_min, (0.2, 2.0), "dropout")
        poisson(spec.saturation_per_min, (0.5, 4.0), "saturation")
        rows.append(eps)
    width = max(1, max(len(r) for r in rows))
    table = np.zeros((len(names), width, 10))
    table[:, :, 0] = -1
    table[:, :, 1] = table[:, :, 2] = -1e9
    table[:, :, 3] = 1.0
    for i, eps in enumerate(rows):
        for j, ep in enumerate(eps):
            table[i, j] = ep
    return Schedule(kind=table[:, :, 0].astype(np.int16), start=table[:, :, 1], end=table[:, :, 2],
                    ramp=table[:, :, 3], dsbp=table[:, :, 4], ddbp=table[:, :, 5], dhr=table[:, :, 6],
                    symp=table[:, :, 7], p1=table[:, :, 8], p2=table[:, :, 9])


def _episode(kind: str, start: float, end: float, rng: np.random.Generator) -> tuple[float, ...]:
    code = LABEL_CODES[kind]
    if kind == "activity":  # walking, stairs: systolic and heart rate rise, diastolic little
        return (code, start, end, rng.uniform(15, 40), rng.uniform(12, 25), rng.uniform(2, 7),
                rng.uniform(18, 35), rng.uniform(0.6, 1.0), 0.0, 0.0)
    if kind == "stress":  # mental stress: both pressures rise, vasoconstriction
        return (code, start, end, rng.uniform(20, 60), rng.uniform(8, 18), rng.uniform(5, 11),
                rng.uniform(5, 14), rng.uniform(0.4, 0.8), 0.0, 0.0)
    if kind == "atrial_fibrillation":
        return (code, start, end, 1.0, 0.0, 0.0, rng.uniform(8, 22), 0.2, rng.uniform(4.5, 7.5), 0.0)
    if kind == "motion":
        return (code, start, end, 1e-3, 0.0, 0.0, 0.0, 0.0, rng.uniform(0.6, 3.0), rng.uniform(0, 2 * np.pi))
    return (code, start, end, 1e-3, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
