# kling-relay container image. Not built on the development machines (no Docker engine there):
# checked by .ci/check-container (hadolint and a structural check of docker-compose.yml).
#
#   docker build -t kling-relay .
#   docker run -p 8080:8080 -e COMETAPI_KEY=sk-... -e KLING_RELAY_SERVER__PUBLIC_URL=https://relay.example.com \
#              -v relay-data:/data kling-relay
#   docker run -p 8080:8080 kling-relay serve --simulate        # offline demo

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: source changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked --no-default-features \
    && rm -rf src
COPY src src
COPY migrations migrations
COPY config config
# Without the default `bench` feature: the image holds the service, not the benchmark tool.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --no-default-features --bin kling-relay

FROM debian:bookworm-slim
# ca-certificates: upstream is reached over TLS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates=20230311* \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data relay \
    && mkdir -p /data \
    && chown relay /data
COPY --from=build /src/target/release/kling-relay /usr/local/bin/kling-relay
USER 10001
WORKDIR /data
# Configuration comes from the environment (KLING_RELAY_<SECTION>__<KEY>, COMETAPI_KEY).
ENV KLING_RELAY_SERVER__LISTEN=0.0.0.0:8080 \
    KLING_RELAY_DATABASE__URL=sqlite:///data/kling-relay.db \
    KLING_RELAY_ARCHIVE__PATH=/data/archive
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["kling-relay", "healthcheck", "--url", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["kling-relay"]
CMD ["serve"]
