# syntax=docker/dockerfile:1.7
# llmworker image: dependencies are installed in a builder stage into a virtual
# environment, then only that environment is copied into a slim runtime that runs as an
# unprivileged user. Build: docker build -t llmworker .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /build
RUN python -m venv /opt/venv
# Dependencies first, from pyproject.toml alone: this layer is reused until they change.
# The server's and the tracing's (OTEL_EXPORTER_OTLP_ENDPOINT), without the "embedded"
# extra: containers use the compose file's Redis.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server'] + p['optional-dependencies']['otel']))" > requirements.txt \
    && pip install -r requirements.txt
COPY README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps . \
    && python -m compileall -q /opt/venv/lib

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="llmworker" \
      org.opencontainers.image.description="Self-hosted HTTP worker for slow LLM jobs" \
      org.opencontainers.image.source="https://github.com/llmworker/llmworker"
RUN groupadd --system --gid 10001 llmworker \
    && useradd --system --uid 10001 --gid llmworker --home-dir /app --shell /usr/sbin/nologin llmworker \
    && mkdir -p /app \
    && chown llmworker:llmworker /app
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    LOG_FORMAT=json
WORKDIR /app
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 CMD ["llmworker", "check"]
STOPSIGNAL SIGTERM
CMD ["llmworker", "serve"]
