# Conveyor: `make run` starts the platform, `make test` runs every check.
PYTHON ?= python3
UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(PYTHON) -m uv
endif

.PHONY: run test lint typecheck env bench clean

env: .venv/.synced

.venv/.synced: pyproject.toml uv.lock
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) sync --frozen --quiet --compile-bytecode
	@touch $@

run: env
	$(UV) run --frozen conveyor migrate
	$(UV) run --frozen conveyor up

lint: env
	$(UV) run --frozen ruff check conveyor bench tests
	$(UV) run --frozen ruff format --check conveyor bench tests

typecheck: env
	$(UV) run --frozen mypy conveyor

test: lint typecheck
	$(UV) run --frozen pytest

bench: env
	$(UV) run --frozen python -m bench.throughput --jobs 20000

clean:
	rm -rf .venv var .mypy_cache .ruff_cache .pytest_cache
