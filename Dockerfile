# One image, every process: `presence <subcommand>`.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libcurl4-openssl-dev zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p presence

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/presence /usr/local/bin/presence
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/presence"]
