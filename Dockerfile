# One image for both roles of ensemble-serving:
#   ensemble-serve (default CMD)   the HTTP service on 0.0.0.0:8000 and gRPC on 8001, repository /models
#   ensemble-train ...             training, `ensemble-train schedule ...` for the retraining job
#
#   docker build -t ensemble-serving .
#   docker run -v models:/models ensemble-serving ensemble-train --data digits --name digits --repository /models --if-empty
#   docker run -v models:/models:ro -p 8000:8000 -p 8001:8001 ensemble-serving
#
# Stages: `requirements` turns pyproject.toml's dependency list into requirements.txt; `deps`
# installs those into /opt/venv (the big, slow layer: TensorFlow); `wheel` builds the project's
# own wheel. The final stage is a fresh python:3.11-slim with /opt/venv copied in and the wheel
# installed on top: no compilers, no pip cache, no source tree. Editing the code rebuilds only
# the wheel and a layer of a few hundred KB; the dependency layers stay cached (their cache key
# is requirements.txt's content, so even a version bump in pyproject.toml keeps them).
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS requirements
WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')"

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=requirements /src/requirements.txt /tmp/requirements.txt
RUN pip install --upgrade pip && pip install -r /tmp/requirements.txt

FROM deps AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY training ./training
COPY service ./service
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ARG UID=10001
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    MPLBACKEND=Agg \
    ENSEMBLE_HOST=0.0.0.0 \
    ENSEMBLE_PORT=8000 \
    ENSEMBLE_GRPC_PORT=8001 \
    ENSEMBLE_REPOSITORY=/models \
    ENSEMBLE_MAX_BODY_BYTES=8388608 \
    ENSEMBLE_MAX_INFLIGHT_BYTES=67108864 \
    ENSEMBLE_MAX_INFLIGHT_BYTES_PER_PEER=67108864 \
    ENSEMBLE_MAX_GRPC_CALLS=12 \
    ENSEMBLE_MAX_CONNECTIONS=256
# The memory limits above keep what clients can make one process hold (docs/operations.md,
# "Memory under hostile clients") within the 1.5 GiB the Deployment and compose give the api.
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it and volumes can be chowned to
# it. /models (the repository) and /state (ENSEMBLE_STATE_DIR, pins) are created owned by it: a
# fresh named volume mounted there takes that ownership, so the user can write into it.
RUN groupadd --gid ${UID} ensemble \
    && useradd --uid ${UID} --gid ensemble --home-dir /home/ensemble --create-home \
       --shell /usr/sbin/nologin ensemble \
    && mkdir -p /models /state \
    && chown ensemble:ensemble /models /state
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
USER ${UID}:${UID}
WORKDIR /home/ensemble
# matplotlib (the training report's pictures) builds its font cache on first import: once here,
# not in every container start.
RUN python -c "import matplotlib.font_manager"
EXPOSE 8000 8001
# Liveness only (the process answers); readiness (a version is live) is /readyz, for load
# balancers and Kubernetes. No curl in the slim image: Python's own urllib.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ENSEMBLE_PORT', '8000'), timeout=2).status == 200 else 1)"]
# uvicorn drains on SIGTERM: it stops accepting, lets in-flight requests finish (up to
# ENSEMBLE_SHUTDOWN_GRACE_SECONDS, default 30), then exits. Give the container longer than that
# before SIGKILL: docker stop -t 40, compose stop_grace_period: 40s, Kubernetes
# terminationGracePeriodSeconds: 45. The scheduler (ensemble-train schedule) also ends on SIGTERM.
STOPSIGNAL SIGTERM
CMD ["ensemble-serve"]
