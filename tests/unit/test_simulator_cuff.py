"""The fleet's simulated cuff: which readings a patient gets (enrolment, schedule, stale, missing), what a
reading is (true pressure plus seeded Gaussian error of the configured SD) and the truth file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bpstream.simulators.errors import InvalidParameterError
from bpstream.simulators.fleet import CuffTruth, FleetConfig, cuff_times, load_truth, simulated_cuff
from bpstream.simulators.scenarios import CALIBRATION_PLANS, SCENARIOS, assign_scenarios, scenario_spec


def test_scenarios_declare_their_cuff_plan() -> None:
    assert {spec.calibration for spec in SCENARIOS.values()} <= set(CALIBRATION_PLANS)
    assert scenario_spec("stale_calibration").calibration == "once"
    assert scenario_spec("missing_enrolment").calibration == "never"
    # every other scenario is enrolled and re-calibrated on the schedule
    others = {s.calibration for n, s in SCENARIOS.items() if n not in ("stale_calibration", "missing_enrolment")}
    assert others == {"scheduled"}
    # the calibration scenarios have normotensive physiology
    for name in ("stale_calibration", "missing_enrolment"):
        assert scenario_spec(name).baseline_sbp == scenario_spec("normotensive").baseline_sbp


def test_cuff_times_follow_the_plan() -> None:
    assert cuff_times("scheduled", 1800, 10, 600) == [10, 610, 1210]
    assert cuff_times("scheduled", 1810, 10, 600) == [10, 610, 1210, 1810]
    assert cuff_times("scheduled", 120, 10, None) == [10]
    assert cuff_times("once", 1800, 10, 600) == [10]
    assert cuff_times("never", 1800, 10, 600) == []
    assert cuff_times("scheduled", 5, 10, 600) == []  # the run ends before the enrolment
    with pytest.raises(InvalidParameterError):
        cuff_times("sometimes", 100, 10, 60)


def test_simulated_cuff_error_has_the_configured_spread_and_is_plausible() -> None:
    rng = np.random.default_rng(3)
    errors = rng.normal(0.0, 5.0, (4000, 2))
    readings = np.array([simulated_cuff(130.0, 80.0, e[0], e[1]) for e in errors])
    assert readings[:, 0].std() == pytest.approx(5.0, rel=0.08)
    assert readings[:, 1].std() == pytest.approx(5.0, rel=0.08)
    assert abs(readings[:, 0].mean() - 130.0) < 0.5
    assert np.all(readings == np.round(readings))  # whole mmHg, like a cuff
    assert simulated_cuff(400.0, 10.0, 0.0, 0.0) == (300.0, 20.0)  # clipped into the bridge's ranges
    sbp, dbp = simulated_cuff(60.0, 58.0, -8.0, 8.0)
    assert sbp > dbp


def test_fleet_config_checks_the_cuff_settings() -> None:
    ok = FleetConfig("127.0.0.1", 1883, devices=2, duration_s=60, enrol=True, recalibrate_every_s=30)
    assert ok.enrol and ok.cuff_sd_mmhg == 5.0
    for bad in ({"enrol_at_s": 0.0}, {"recalibrate_every_s": 5.0}, {"cuff_sd_mmhg": -1.0},
                {"cuff_id": "bad id"}, {"crisis_onset_s": -1.0}):
        with pytest.raises(InvalidParameterError):
            FleetConfig("127.0.0.1", 1883, devices=2, duration_s=60, enrol=True, **bad)  # type: ignore[arg-type]
    assert FleetConfig("127.0.0.1", 1883, devices=2, duration_s=60, crisis_onset_s=None).crisis_onset_s is None


def test_calibration_scenarios_can_be_assigned_per_device() -> None:
    names = assign_scenarios(["normotensive", "stale_calibration", "missing_enrolment"], 3, np.random.default_rng(0))
    assert names == ["normotensive", "stale_calibration", "missing_enrolment"]


def test_cuff_truth_round_trips_through_the_truth_file(tmp_path: Path) -> None:
    cuff = CuffTruth("dev-000", 1_700_000_010_000_000_000, 131.0, 84.0, 127.4, 81.9, "sim-cuff", 0)
    path = tmp_path / "truth.jsonl"
    path.write_text("\n".join([
        json.dumps({"type": "device", "device_id": "dev-000", "scenario": "normotensive"}),
        json.dumps(cuff.as_json())]) + "\n")
    assert load_truth(path).cuffs == [cuff]
