# zchat: broker, bots and terminal client in one small image.
#
#   docker build -t zchat .
#   docker run --rm -p 5555-5557:5555-5557 zchat broker --bind tcp://0.0.0.0:5555
#
# The broker listens on three ports: PORT (requests), PORT+1 (chat lines) and
# PORT+2 (fan-out), so publish all three. BASE may be any image with Python >= 3.11
# and its venv module (scripts/compose-smoke.sh passes a locally built Debian one).
ARG BASE=python:3.12-slim

FROM ${BASE} AS build
LABEL org.zchat.stage=build
# EXTRAS="[redis]" adds the Redis client (several brokers: docker-compose.cluster.yml).
ARG EXTRAS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY zchat ./zchat
# pip compiles the bytecode here, so the non-root user never needs to write it.
RUN python3 -m venv /opt/zchat \
    && /opt/zchat/bin/pip install ".${EXTRAS}"

FROM ${BASE}
# /data holds the broker's history, /config the settings file and the per-name
# secrets: mount volumes there (docker-compose.yml does) so history and names
# outlive the container. No VOLUME line: client containers need no /data.
ENV PATH=/opt/zchat/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ZCHAT_DATA_DIR=/data \
    ZCHAT_CONFIG_DIR=/config
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin zchat \
    && mkdir -p /data /config \
    && chown zchat:zchat /data /config \
    && chmod 700 /config
COPY --from=build /opt/zchat /opt/zchat
USER zchat
WORKDIR /home/zchat
EXPOSE 5555 5556 5557
ENTRYPOINT ["zchat"]
CMD ["--help"]
