"""The writer's InfluxDB client settings and error classification (no server: the integration tests in
tests/integration/test_writer.py and test_influx_auth.py cover the real answers)."""

from __future__ import annotations

import pytest
from influxdb_client.rest import ApiException
from pydantic import SecretStr

from bpstream.services.writer.influx_client import BadPointsError, InfluxWriter, bad_point_reason
from bpstream.shared import influx_api
from bpstream.shared.errors import TransientError
from bpstream.shared.settings import InfluxSettings

pytestmark = pytest.mark.unit


def test_token_is_user_colon_password_and_bucket_is_database_slash_rp() -> None:
    settings = InfluxSettings(database="bp", username="writer", password=SecretStr("s3:cret"),
                              retention_policy="two_years")
    assert influx_api.token(settings) == "writer:s3:cret"
    assert influx_api.bucket(settings) == "bp/two_years"
    assert influx_api.token(InfluxSettings()) is None
    assert influx_api.bucket(InfluxSettings(database="bp")) == "bp"
    assert "s3:cret" not in repr(settings) and "s3:cret" not in settings.url


@pytest.mark.parametrize(("status", "body", "reason"), [
    (400, '{"error":"partial write: field type conflict: input field \\"sbp\\" ... dropped=1"}',
     "field_type_conflict"),
    (400, '{"error":"unable to parse \'bp_estimate,device=d sbp=1x 1\': invalid number"}', "unparsable"),
    (400, '{"error":"partial write: points beyond retention policy dropped=3"}', "beyond_retention"),
    (413, "", "too_large"),
    (400, "{}", "http_400"),
])
def test_bad_point_reasons_never_quote_the_body(status: int, body: str, reason: str) -> None:
    assert bad_point_reason(status, body) == reason


@pytest.mark.parametrize(("status", "retriable"), [
    (0, True), (500, True), (503, True), (401, True), (403, True), (404, True), (405, True), (408, True),
    (429, True), (400, False), (413, False), (422, False),
])
async def test_which_answers_are_retried(status: int, retriable: bool) -> None:
    async with InfluxWriter(InfluxSettings()) as writer:
        error = writer._classify(ApiException(status=status, reason="dev-7 sbp=171.25"), what="influx write")
    assert isinstance(error, TransientError if retriable else BadPointsError)
    assert "171.25" not in f"{error} {error.reason}"  # the status only, never the server's text
