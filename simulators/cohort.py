"""One entry point that turns (scenario, number of devices, seed) into a ready signal engine.

Both the dataset writer and the MQTT fleet use it, so the same seed gives the same patients in both.
Independent random streams (scenario draw, physiology, episodes, beat-to-beat and sample noise) are spawned
from one ``SeedSequence``, so changing one stage's use of randomness does not reshuffle the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bpstream.simulators.engine import SignalEngine
from bpstream.simulators.errors import InvalidParameterError
from bpstream.simulators.patients import Profiles, draw_profiles
from bpstream.simulators.scenarios import Schedule, assign_scenarios, build_schedule, scenario_spec

GENERATOR_VERSION = "bpstream-sim/1"
MAX_DEVICES = 200_000


@dataclass(slots=True)
class Cohort:
    names: list[str]
    profiles: Profiles
    schedule: Schedule
    engine: SignalEngine


def build_cohort(scenario: str | Sequence[str], n: int, seed: int, duration_s: float, *,
                 sample_rate: float = 125.0, crisis_onset_s: float | None = 30.0,
                 crisis_duration_s: float | None = None) -> Cohort:
    """Patients, episode schedules and the engine for ``n`` devices.

    ``crisis_onset_s=None`` draws each crisis/hypotension onset uniformly within the first 60 % of the record
    (datasets); a number puts every onset there (fleets and demos).
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_DEVICES:
        raise InvalidParameterError(f"number of devices/subjects must be an integer in [1, {MAX_DEVICES}], got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidParameterError(f"seed must be a non-negative integer, got {seed!r}")
    if not (10.0 <= sample_rate <= 2000.0):
        raise InvalidParameterError(f"sample rate must be within [10, 2000] Hz, got {sample_rate}")
    if not np.isfinite(duration_s) or duration_s <= 0:
        raise InvalidParameterError(f"duration must be positive, got {duration_s}")
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]
    names = assign_scenarios(scenario, int(n), streams[0])
    profiles = draw_profiles(names, streams[1])
    if crisis_onset_s is None:
        onset: float | np.ndarray = streams[2].uniform(0.05, 0.6, len(names)) * duration_s
    else:
        onset = crisis_onset_s
    schedule = build_schedule(names, profiles.sbp0, profiles.dbp0, duration_s, streams[2], crisis_onset_s=onset,
                              crisis_ramp_s=min(20.0, max(2.0, 0.1 * duration_s)),
                              crisis_duration_s=crisis_duration_s)
    engine = SignalEngine(profiles, schedule, [scenario_spec(s) for s in names], streams[3], sample_rate)
    return Cohort(names, profiles, schedule, engine)
