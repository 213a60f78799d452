# syntax=docker/dockerfile:1
#
# meterd as a sidecar image: one static binary on a distroless base, non-root, read-only root filesystem.
#
#   docker build -t meterd:dev .
#   docker run --rm --read-only -v meterd-journal:/var/lib/meterd -v $PWD/meterd.toml:/etc/meterd/meterd.toml:ro meterd:dev
#
# The binary is built for x86_64-unknown-linux-musl: fully static (musl's own DNS resolver, no NSS, no libc in
# the image), rustls for TLS. ci/static-build.sh runs the same build outside Docker. No HEALTHCHECK: Kubernetes
# probes GET /healthz and /readyz (see deploy/kubernetes/).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --profile dist --target x86_64-unknown-linux-musl \
 && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs \
 && cargo build --profile dist --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/dist/meterd /meterd \
 && /meterd --help >/dev/null

# distroless/static: no shell, no libc; CA certificates (needed: meterd verifies TLS against the system roots),
# /etc/passwd with the nonroot user (65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /meterd /usr/local/bin/meterd
USER 65532:65532
# The journal (SQLite, WAL). Mount a persistent local volume here (not emptyDir, not NFS/SMB).
VOLUME ["/var/lib/meterd"]
ENV STATE_DIRECTORY=/var/lib/meterd
EXPOSE 8787
ENTRYPOINT ["/usr/local/bin/meterd"]
CMD ["run", "--config", "/etc/meterd/meterd.toml"]
