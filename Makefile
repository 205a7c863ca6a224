# nuwa-serve: `make serve` starts the service on the built-in model, `make test` runs every check.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup serve test test-image test-image-gpu lint format clean

$(PY):
	python3 -m venv $(VENV)

# torch first, pinned: the local CPU wheel. A bare `torch` requirement would pull CUDA builds.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

serve: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m service

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: $(STAMP) lint
	bash scripts/ensure-prometheus.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

# Deployment checks only (hadolint, kubernetes-validate, promtool, a real Prometheus scraping the service).
.PHONY: test-deploy
test-deploy: $(STAMP)
	bash scripts/ensure-prometheus.sh
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q tests/deploy

# The image, built and run for real: podman (installed with apt when missing), a Debian base made with
# debootstrap and cached, the CPU flavour of docker/Dockerfile, then tests/image against the running container
# on 127.0.0.1 (scripts/test-image.sh; docs/DEPLOY.md "Verification"). Skips loudly where no engine can be had or
# the package registries cannot be reached.
test-image: $(STAMP)
	PY=$(PY) bash scripts/test-image.sh cpu

# The GPU flavour, as far as a machine without a GPU can take it (several GB of CUDA wheels, a 5.5 GB image;
# not in CI).
test-image-gpu: $(STAMP)
	PY=$(PY) bash scripts/test-image.sh gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
