"""Line-protocol encoding of InfluxDB points (shared/influx.py); the real server reads them back in
tests/integration/test_servers.py."""

from __future__ import annotations

import pytest

from bpstream.shared.influx import line

pytestmark = pytest.mark.unit
T = 1_700_000_000_000_000_000


def test_field_types_are_encoded_as_influx_types() -> None:
    point = line("m", {}, {"f": 1.5, "i": 3, "t": True, "n": False, "s": "v1"}, T)
    assert point == f'm f=1.5,i=3i,t=true,n=false,s="v1" {T}'


def test_bool_is_not_written_as_integer() -> None:
    assert line("m", {}, {"ok": True}, T) == f"m ok=true {T}"


def test_float_keeps_full_precision() -> None:
    assert line("m", {}, {"x": 0.1 + 0.2}, T) == f"m x={0.1 + 0.2!r} {T}"


def test_tags_are_sorted_and_empty_tag_values_left_out() -> None:
    assert line("m", {"z": "1", "a": "2", "empty": ""}, {"x": 1}, T) == f"m,a=2,z=1 x=1i {T}"


def test_separators_in_names_and_tags_are_escaped() -> None:
    point = line("bp alert,x", {"clinic": "a b,c=d"}, {"field key": 1}, T)
    assert point == rf"bp\ alert\,x,clinic=a\ b\,c\=d field\ key=1i {T}"


def test_line_break_never_splits_a_point() -> None:
    point = line("m", {"t": "a\nb"}, {"s": "x\ny"}, T)
    assert "\n" not in point


def test_string_fields_escape_quotes_and_backslashes() -> None:
    assert line("m", {}, {"s": 'a "b" c\\'}, T) == f'm s="a \\"b\\" c\\\\" {T}'


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_and_missing_fields_are_dropped(bad: float | None) -> None:
    assert line("m", {}, {"x": 1.0, "y": bad}, T) == f"m x=1.0 {T}"


def test_point_without_any_finite_field_is_an_error() -> None:
    with pytest.raises(ValueError, match="no finite field"):
        line("m", {"t": "1"}, {"x": float("nan"), "y": None}, T)


def test_timestamp_is_integer_nanoseconds() -> None:
    assert line("m", {}, {"x": 1}, T).endswith(f" {T}")
