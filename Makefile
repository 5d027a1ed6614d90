# One way to install, run, lint, test and benchmark: the README and CI call these.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run dev test lint typecheck bench bench-peers chaos fake-llm clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[server,embedded,otel,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/llmworker serve

# Development: Redis from deploy/dev/compose.yaml (or any on 127.0.0.1:6379), reload on change.
dev: $(STAMP)
	REDIS_URL=$${REDIS_URL:-redis://127.0.0.1:6379/0} $(BIN)/llmworker serve --reload

# The TypeScript client's packages (clients/typescript), from its lock file.
TS := clients/typescript
$(TS)/node_modules/.installed: $(TS)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(TS) && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else \
		echo "make: no npm here: the TypeScript client's tests are skipped (they need Node 20 and npm)"; \
	fi

test: $(STAMP) $(TS)/node_modules/.installed
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.run

# W1 saturation of llmworker beside saq, dramatiq, taskiq, arq and celery, in one run
# (bench/peers.py; the peers live in .venv-peers, from bench/requirements-peers.txt).
bench-peers: $(STAMP)
	$(BIN)/python -m bench.peers

# Fault injection (bench/chaos.py): kill -9, Redis restarts, provider errors, SIGTERM,
# malformed requests; exits 1 if an invariant fails. tests/test_chaos.py runs it --quick.
chaos: $(STAMP)
	$(BIN)/python -m bench.chaos

fake-llm: $(STAMP)
	$(BIN)/llmworker fake-llm

clean:
	rm -rf $(VENV) .venv-peers .llmworker .pytest_cache .mypy_cache .ruff_cache $(TS)/node_modules $(TS)/dist
