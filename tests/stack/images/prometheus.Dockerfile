# Stand-in for the official prometheus image (tests/stack only): Debian's prometheus, run by an
# unprivileged user with its data in /prometheus, the binary as the entrypoint.
ARG BASE
FROM ${BASE}
RUN mkdir -p /prometheus && chown prometheus:prometheus /prometheus
WORKDIR /prometheus
USER prometheus
ENTRYPOINT ["/usr/bin/prometheus"]
