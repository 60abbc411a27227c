# The tunnel server in a small image: `docker compose up -d` (see compose.yaml and the README).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tunnel

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --no-create-home --home-dir /data --shell /usr/sbin/nologin tunnel \
 && mkdir -p /data && chown tunnel /data
COPY --from=build /src/target/release/tunnel /usr/local/bin/tunnel
USER tunnel
# Data (SQLite database, spool) lives in the /data volume.
ENV XDG_DATA_HOME=/data \
    TUNNEL_LISTEN=0.0.0.0:3456 \
    TUNNEL_DATABASE=/data/tunnel.db \
    TUNNEL_LOG_FORMAT=json
VOLUME /data
EXPOSE 3456
# The port follows TUNNEL_LISTEN, so changing it does not make the container unhealthy.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s \
  CMD curl -fsS "http://127.0.0.1:${TUNNEL_LISTEN##*:}/healthz" || exit 1
ENTRYPOINT ["tunnel"]
CMD ["serve"]
