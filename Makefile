# Everyday commands. `make run` and `make test` work from a fresh clone: they create .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
REPOSITORY ?= models
NAME ?= digits
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install run train serve test test-slow bench clean protos

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v == (3, 11) else "Python 3.11 is required (found %d.%d); set PYTHON=/path/to/python3.11" % v)'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The tests' TensorFlow Serving gRPC client: without its dependencies, which name the
	# `tensorflow` distribution (tensorflow-cpu provides the same modules).
	$(BIN)/python -m pip install --quiet --no-deps 'tensorflow-serving-api==2.21.0'
	touch $@

install: $(STAMP)

## Train the default ensemble if the repository has none, then serve it on $(HOST):$(PORT).
run: $(STAMP)
	$(BIN)/ensemble-train --data digits --name $(NAME) --repository $(REPOSITORY) --if-empty
	$(BIN)/ensemble-serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --default-model $(NAME)

## Train and publish a new version, whatever the repository holds.
train: $(STAMP)
	$(BIN)/ensemble-train --data digits --name $(NAME) --repository $(REPOSITORY)

serve: $(STAMP)
	$(BIN)/ensemble-serve --repository $(REPOSITORY) --host $(HOST) --port $(PORT) --default-model $(NAME)

test: $(STAMP)
	$(BIN)/ruff check --no-cache --select F,E9 contract service training tests benchmarks mutation
	$(BIN)/python -m pytest -m "not slow"

# What is generated from the .proto files (checked in; run after editing one): the Open Inference
# Protocol's modules, and the descriptor set of TensorFlow Serving's definitions (service/protocols/gen/tfs).
protos: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. service/protocols/gen/*.proto
	cd service/protocols/gen/tfs && ../../../../$(BIN)/python -m grpc_tools.protoc -I . --include_imports \
		--descriptor_set_out=../tensorflow_serving.binpb $$(find . -name '*.proto' | sort)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

## The serving benchmark (benchmarks/RESULTS.md): wrk from Debian, LitServe only for the benchmark.
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m pip install --quiet litserve
	$(BIN)/ensemble-train --data digits --name $(NAME) --repository $(REPOSITORY) --if-empty
	$(BIN)/python benchmarks/bench.py --repository $(REPOSITORY) --name $(NAME)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

## The image for real (tests/test_container.py): podman build on a local stand-in for
## python:3.11-slim, trainer and api containers, then api + trainer with podman-compose.
.PHONY: test-container
test-container: $(STAMP)
	ENSEMBLE_CONTAINER_TESTS=1 $(BIN)/python -m pytest -m slow tests/test_container.py

## Mutation testing (not in CI): mutmut over batching, the codecs, repository, lifecycle, engines,
## in a copy of HEAD under .mutation/, one mutant at a time (docs/development.md#mutation-testing).
## GROUPS="batching codecs" runs some groups only.
.PHONY: mutation
mutation: $(STAMP)
	$(BIN)/python -c 'import mutmut' 2>/dev/null || $(BIN)/python -m pip install --quiet 'mutmut>=3.8.1'
	$(BIN)/python mutation/run.py $(GROUPS)
