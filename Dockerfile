# Build: docker build -t kling-relay .
# Run:   docker run -p 8080:8080 -e COMETAPI_KEY=... -v relay-data:/data kling-relay
#        docker run -p 8080:8080 kling-relay serve --simulate   (offline demo)
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so code changes do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked && rm -rf src
COPY src src
COPY migrations migrations
COPY config config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data relay \
    && mkdir -p /data && chown relay /data
COPY --from=build /src/target/release/kling-relay /usr/local/bin/kling-relay
USER relay
WORKDIR /data
ENV KLING_RELAY_SERVER__LISTEN=0.0.0.0:8080 \
    KLING_RELAY_DATABASE__URL=sqlite:///data/kling-relay.db
VOLUME /data
EXPOSE 8080
ENTRYPOINT ["kling-relay"]
CMD ["serve"]
