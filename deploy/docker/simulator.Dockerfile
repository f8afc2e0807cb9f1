# syntax=docker/dockerfile:1
# bpstream wearable fleet simulator.
# Build from the repository root:  docker build -f deploy/docker/simulator.Dockerfile -t bpstream/simulator:0.1.0 .
# Stage 1 builds the bpstream wheel and a virtual environment with only this image's requirements;
# stage 2 copies that environment onto a clean slim base and runs as an unprivileged user.

FROM python:3.11.11-slim-bookworm AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY bpstream ./bpstream
COPY shared ./shared
COPY services ./services
COPY simulators ./simulators
COPY training ./training
COPY deploy/docker/requirements ./requirements
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r requirements/simulator.txt \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/bpstream-*.whl

FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="bpstream-simulator" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bpstream \
 && useradd --system --uid 10001 --gid bpstream --no-create-home --shell /usr/sbin/nologin bpstream
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
# The simulator serves no /healthz: it is a load generator, restarted by its orchestrator if it exits.
HEALTHCHECK NONE
ENTRYPOINT ["bpstream"]
CMD ["simulate", "fleet", "--devices", "50", "--broker", "mqtt://mosquitto:1883", "--speed", "1", "--scenario", "clinic"]
