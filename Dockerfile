# One image, every process: `presence <subcommand>`.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libssl-dev libcurl4-openssl-dev zlib1g-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The commit presence_build_info reports (cli/build.rs falls back to `git rev-parse`, then
# `unknown`): docker build --build-arg PRESENCE_COMMIT=$(git rev-parse --short=12 HEAD) .
ARG PRESENCE_COMMIT=""
RUN cargo build --release --locked -p presence

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 libcurl4 zlib1g curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/presence /usr/local/bin/presence
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/presence"]
