# Stand-in for the official redis image (tests/stack only): Debian's redis-server, run by the
# redis user in /data. Unlike the official image it keeps protected mode on: the stack sets a
# password (requirepass), so it never relies on protected mode being off.
ARG BASE
FROM ${BASE}
RUN mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
CMD ["redis-server"]
