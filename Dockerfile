# One image for the four streamlearn services (ingestion, learner, scorer, monitor).
# Build from the repository root:   docker build -t streamlearn:0.1.0 .
# Pick the service with the command: docker run streamlearn:0.1.0 python -m services.scorer
# All configuration comes from STREAMLEARN_* environment variables (services/runtime/settings.py).

# ---- build: install the project and its dependencies into a virtualenv ----------------------------
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
# every runtime dependency ships a manylinux wheel for CPython 3.11: no compiler needed
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY services ./services
RUN pip install --upgrade pip \
 && pip install . \
 && python -c "import services.runtime.settings, services.ingestion.app, services.learner.app, services.scorer.app, services.monitor.app"

# ---- runtime ---------------------------------------------------------------------------------------
FROM python:3.11-slim

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STREAMLEARN_METRICS_HOST=0.0.0.0 \
    STREAMLEARN_METRICS_PORT=9100

COPY --from=build /opt/venv /opt/venv

# fixed uid/gid so that Kubernetes securityContext (runAsUser 10001) and volumes line up
RUN groupadd --system --gid 10001 streamlearn \
 && useradd --system --uid 10001 --gid streamlearn --home-dir /app --create-home --shell /usr/sbin/nologin streamlearn
WORKDIR /app
USER 10001:10001

# /metrics, /healthz, /readyz
EXPOSE 9100

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:9100/healthz', timeout=4)"]

CMD ["python", "-m", "services.ingestion"]
