# syntax=docker/dockerfile:1
# bpstream inference on NVIDIA GPUs (CUDA variant of inference.Dockerfile).
# Build from the repository root:  docker build -f deploy/docker/inference-cuda.Dockerfile -t bpstream/inference:0.1.0-cuda .
# Stage 1 builds the bpstream wheel and a virtual environment with only this image's requirements;
# stage 2 copies that environment onto a clean slim base and runs as an unprivileged user.
# Why not an nvidia/cuda base: the PyPI torch wheel carries its own CUDA runtime, cuBLAS and cuDNN
# libraries; the host only provides the driver (libcuda), which the NVIDIA container toolkit mounts into
# the container. A CUDA base image would add a second, unused copy of those libraries.

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
 && /opt/venv/bin/pip install -r requirements/inference-cuda.txt \
 && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-deps /wheels/bpstream-*.whl

FROM python:3.11.11-slim-bookworm AS runtime
LABEL org.opencontainers.image.title="bpstream-inference-cuda" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 bpstream \
 && useradd --system --uid 10001 --gid bpstream --no-create-home --shell /usr/sbin/nologin bpstream
COPY --from=builder /opt/venv /opt/venv
# The repository's exported model versions: served when no models volume is mounted over them.
COPY models /opt/bpstream/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BPSTREAM_INFERENCE_METRICS_PORT=9100 \
    BPSTREAM_INFERENCE_METRICS_HOST=0.0.0.0 \
    BPSTREAM_INFERENCE_MODEL_PATH=/opt/bpstream/models \
    BPSTREAM_INFERENCE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['BPSTREAM_INFERENCE_METRICS_PORT'] + '/healthz', timeout=4)"]
ENTRYPOINT ["bpstream"]
CMD ["inference"]
