# syntax=docker/dockerfile:1
# bpstream notifier: alert episodes -> webhook and e-mail, once per transition.
# Build from the repository root:  docker build -f deploy/docker/notifier.Dockerfile -t bpstream/notifier:0.1.0 .
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
 && /opt/venv/bin/pip install -r requirements/notifier.txt \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/bpstream-*.whl

FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="bpstream-notifier" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bpstream \
 && useradd --system --uid 10001 --gid bpstream --no-create-home --shell /usr/sbin/nologin bpstream
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BPSTREAM_ALERTING_METRICS_PORT=9100 \
    BPSTREAM_ALERTING_METRICS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['BPSTREAM_ALERTING_METRICS_PORT'] + '/healthz', timeout=4)"]
ENTRYPOINT ["bpstream"]
CMD ["notifier"]
