# Builds the `anteroom` binary; the same image runs `proxy` or `dispatch`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin anteroom

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/anteroom /usr/local/bin/anteroom
USER nobody
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/anteroom"]
CMD ["--help"]
