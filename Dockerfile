# syntax=docker/dockerfile:1
#
# devmeter's production image: the `devmeter` command (service, migrations, admin CLI).
# Build from the repository root:  docker build -t devmeter .
# deploy/compose.yaml builds and runs it beside TimescaleDB and Mosquitto.

# --- build: resolve the locked dependencies and install devmeter into /app/.venv ----------
FROM python:3.11-slim AS build

# Pinned: the same uv reads uv.lock the same way on every build.
RUN pip install --no-cache-dir uv==0.13.8

# Bytecode compiled at build time, so the read-only install is not recompiled at each start;
# copy (not hardlink) because the cache mount is another filesystem; never download a Python:
# the image's own 3.11 is the one the final stage runs.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv

WORKDIR /src

# Dependencies alone first: this layer is reused until pyproject.toml or uv.lock change.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-install-project

# Only what the wheel is built from (hatch packages + the readme its metadata names), so
# local files (.venv, .devmeter, tests) never reach the image.
COPY README.md ./
COPY devmeter ./devmeter
COPY metering ./metering
COPY ingest ./ingest
COPY api ./api
COPY console ./console
# --no-editable: devmeter is installed into the venv as a package, so the final stage needs
# the venv and nothing from /src.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable

# --- runtime -------------------------------------------------------------------------------
FROM python:3.11-slim

# Mosquitto for `devmeter broker` (the compose file's broker service): devmeter renders its
# password and ACL files and reloads it.
COPY ingest/broker_guard/devmeter_guard.c /tmp/devmeter_guard.c
RUN apt-get update \
    && apt-get install -y --no-install-recommends mosquitto gcc libc6-dev mosquitto-dev libmosquitto-dev \
    && mkdir -p /usr/local/lib/devmeter \
    && cc -shared -fPIC -O2 -Wall -Werror -o /usr/local/lib/devmeter/devmeter_guard.so /tmp/devmeter_guard.c \
    && apt-get purge -y --auto-remove gcc libc6-dev mosquitto-dev libmosquitto-dev \
    && rm -rf /var/lib/apt/lists/* /tmp/devmeter_guard.c

RUN groupadd --system --gid 10001 devmeter \
    && useradd --system --uid 10001 --gid devmeter --home-dir /var/lib/devmeter \
        --create-home --shell /usr/sbin/nologin devmeter

# Owned by root: the service user can run the code but not change it.
COPY --from=build /app/.venv /app/.venv

# DEVMETER_DATA_DIR: `devmeter up` writes its runtime file there (and, should it be started
# without DEVMETER_DATABASE_URL / DEVMETER_MQTT_URL, the embedded servers' data), so it must
# be writable by the service user, unlike the default ./.devmeter under /app.
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEVMETER_DATA_DIR=/var/lib/devmeter

WORKDIR /var/lib/devmeter
USER devmeter:devmeter

EXPOSE 8000
ENTRYPOINT ["devmeter"]
CMD ["up"]
