# Stand-in for the official python image (tests/stack only): Debian's python3 on a root
# filesystem from mmdebstrap, plus this machine's pip configuration, CA bundle and local wheels,
# so that pip inside a build finds what pip on this machine finds.
ARG BASE
FROM ${BASE}
COPY pip/ /
RUN ln -s /usr/bin/python3 /usr/local/bin/python
ENV LANG=C.UTF-8
CMD ["python3"]
