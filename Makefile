# Two commands set everything up from a bare machine:
#   make serve   - create/refresh the venv, then serve the API on :3000
#   make test    - create/refresh the venv, then lint, type-check and run the tests
# Configuration goes through environment variables (see README): e.g.
#   RIFFUSION_MODEL=tiny make serve

PYTHON ?= python3
UV ?= $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
VENV := .venv
RUN := $(UV) run --frozen --all-extras
PORT ?= 3000

.PHONY: venv browser serve test lint typecheck pytest prometheus bench loadtest seed-images bento-requirements bento clean gpu-wheels

venv: $(VENV)/.synced

$(VENV)/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet "uv>=0.5"
	$(UV) sync --frozen --all-extras
	@touch $@

serve: venv
	$(RUN) bentoml serve service:Riffusion --host 0.0.0.0 --port $(PORT)

lint: venv
	$(RUN) ruff check .
	$(RUN) ruff format --check .

typecheck: venv
	$(RUN) mypy

# The playground's browser tests (tests/test_ui.py) drive Debian's chromium through
# playwright; install it when missing (CI runs as root; elsewhere through sudo).
CHROMIUM ?= /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium; }

pytest: venv prometheus browser
	$(RUN) pytest $(PYTEST_ARGS)

# Debian's Prometheus for tests/test_prometheus_adapter.py (CI runs as root on a bare machine).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; }

test: lint typecheck pytest

seed-images: venv
	$(RUN) riffusion make-seed-images seed_images

# The wheels the lent GPU machine lacks, as uv.lock pins them, for CPython 3.12 x86-64
# (bench/gpu_kit.py: they travel with the tree as .whl/; fails above 56 MiB).
gpu-wheels:
	$(PYTHON) bench/gpu_kit.py --build-wheels .whl

# The Bento's pinned packages (bentofile.yaml): regenerate after changing uv.lock.
bento-requirements:
	$(UV) export --frozen --no-dev --all-extras --no-hashes --no-emit-project -o deploy/bento-requirements.txt

# Build the Bento (RIFFUSION_MODEL=tiny builds offline; a hub id packs the checkpoint).
bento: venv
	$(RUN) bentoml build

loadtest: venv
	$(RUN) python -m load_tests.run $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
