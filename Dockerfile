# Two-stage build of durable-streams-server.
#   docker build -t durable-streams .
#   docker run -p 4437:4437 -v ds-data:/data durable-streams
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p durable-streams-server

FROM debian:bookworm-slim
RUN useradd --system --home /data durable-streams && mkdir -p /data && chown durable-streams /data
COPY --from=build /src/target/release/durable-streams-server /usr/local/bin/durable-streams-server
USER durable-streams
VOLUME /data
EXPOSE 4437
HEALTHCHECK --interval=10s --timeout=2s CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/4437 && printf 'GET /readyz HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q ' 200 ' <&3"]
ENTRYPOINT ["durable-streams-server"]
CMD ["run", "--host", "0.0.0.0", "--port", "4437", "--data-dir", "/data"]
