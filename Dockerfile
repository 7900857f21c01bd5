# syntax=docker/dockerfile:1
# Three stages from one slim base:
#   build    the runtime dependencies and the service (no torch, no model_export/) in /opt/venv
#   service  the default target: that venv, a non-root user, `dinserve serve` on /models
#   model    build + torch (CPU) + the MovieLens data: trains/exports the demo bundle into /models
#            and loads the demo histories (docker-compose.yml's one-shot `model` job)
# Build the service image with `docker build -t dinserve .`; the model image with
# `docker build --target model -t dinserve-model .`.

FROM python:3.11.11-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# One unprivileged user for both final stages; /models is created here so that a named volume
# mounted on it starts out owned by that user.
RUN groupadd --system --gid 10001 dinserve \
    && useradd --system --uid 10001 --gid dinserve --home-dir /app --no-create-home dinserve \
    && mkdir -p /app /models \
    && chown dinserve:dinserve /app /models

FROM base AS build
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md constraints.txt ./
COPY dinserve ./dinserve
COPY service ./service
# No extras and no offline code: the runtime set of pyproject.toml (fastapi, uvicorn, onnxruntime,
# redis, ...), no torch and no load tools, every version as constraints.txt pins it; model_export/
# (training and export) goes only into the model image.
RUN pip install --no-cache-dir -c constraints.txt .

FROM base AS model
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
# The CPU build of torch first (2.13.0+cpu from PyTorch's index wins over PyPI's CUDA 2.13.0; its
# dependencies at the pinned versions from PyPI), so the export extra finds it satisfied. As in
# the Makefile's install.
RUN pip install --no-cache-dir -c constraints.txt \
        --extra-index-url https://download.pytorch.org/whl/cpu torch==2.13.0
COPY dinserve ./dinserve
COPY service ./service
COPY model_export ./model_export
RUN pip install --no-cache-dir -c constraints.txt "/app[export]"
COPY data ./data
USER 10001:10001
# Train (skipped when /models already holds a demo bundle), export, load the histories into
# REDIS_URL, exit. Training flags can be appended, e.g. `--epochs 3`.
ENTRYPOINT ["dinserve", "demo", "--setup-only", "--workdir", "/app/work", "--models", "/models"]

FROM base AS service
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
ENV CTR_MODEL_DIR=/models \
    CTR_HOST=0.0.0.0 \
    CTR_PORT=8000
VOLUME ["/models"]
EXPOSE 8000
USER 10001:10001
# python is in the image, curl is not: the health check is a one-liner on /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CTR_PORT', '8000') + '/healthz', timeout=2)"]
CMD ["dinserve", "serve"]
