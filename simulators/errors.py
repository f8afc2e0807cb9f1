"""Typed errors of the simulator: bad scenario names and impossible parameters, raised before anything runs."""

from __future__ import annotations

from bpstream.shared.errors import BpstreamError


class SimulatorError(BpstreamError):
    """Root of the simulator's own errors."""

    reason = "simulator"


class UnknownScenarioError(SimulatorError, ValueError):
    """A scenario name the simulator does not know; the message lists the known ones."""

    reason = "unknown_scenario"


class InvalidParameterError(SimulatorError, ValueError):
    """A parameter outside what the simulator (or physiology) allows, e.g. negative devices or speed."""

    reason = "invalid_parameter"


class DataFormatError(SimulatorError):
    """A dataset or recording on disk that cannot be read (missing columns, wrong version, truncated)."""

    reason = "data_format"
