# runsvc build, check and run targets. `make` alone lists them.

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
INSTALL_STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
NODE_STAMP := node_modules/.installed
BUF := node_modules/.bin/buf
PY_SOURCES = $(wildcard runsvc tests migrations tools clients)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

PY_SOURCES += $(wildcard bench)

VERSION := $(shell cat clients/runsvc_client/VERSION)

.PHONY: docs bench-profile test-fast test-shuffled dist image bench bench-history bench-soak bench-pg help install node_modules proto proto-check k8s-rules buf-lint lint lint-py services test run migrate clean demo monitoring-tools bench-metrics

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_.-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(INSTALL_STAMP) ## Create .venv and install runsvc, runsvc-client and the test tools

# Serving needs the two packages only; `make test` adds the test tools to the same .venv.
$(RUN_STAMP): pyproject.toml clients/pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	@$(VENV_PY) -m pip install --quiet --disable-pip-version-check -e ./clients -e .
	@touch $@

$(INSTALL_STAMP): pyproject.toml clients/pyproject.toml
	@test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install --disable-pip-version-check -e ./clients -e '.[test]'
	@touch $@

node_modules: $(NODE_STAMP) ## Install the Node tools (buf) from package-lock.json

$(NODE_STAMP): package.json $(wildcard package-lock.json)
	@if [ -f package-lock.json ]; then \
		npm ci --no-audit --no-fund; \
	else \
		npm install --no-audit --no-fund; \
	fi
	@touch $@

proto: $(INSTALL_STAMP) ## Regenerate clients/runsvc_client/v1 from proto/
	$(VENV_PY) tools/gen_proto.py

proto-check: $(INSTALL_STAMP) ## Fail if clients/runsvc_client/v1 is not what proto/ generates
	$(VENV_PY) tools/gen_proto.py --check

k8s-rules: $(INSTALL_STAMP) ## Regenerate deploy/kubernetes/prometheusrule.yaml from the Prometheus rules
	$(VENV_PY) tools/gen_k8s_rules.py

buf-lint: $(NODE_STAMP) ## Lint and format-check the .proto files with buf
	$(BUF) lint
	$(BUF) format --diff --exit-code

lint: lint-py buf-lint ## ruff, mypy and buf lint

lint-py: $(INSTALL_STAMP) ## ruff check, ruff format --check, mypy on the server, its tests and the client
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/ruff format --check $(PY_SOURCES)
	$(VENV)/bin/mypy runsvc tests
	$(VENV)/bin/mypy --strict clients/runsvc_client clients/examples

services: ## Make sure PostgreSQL and Redis are reachable for the tests
	@bash scripts/services.sh

test: $(INSTALL_STAMP) $(NODE_STAMP) ## Services, proto-check, lint, then pytest (PYTEST_ARGS=...)
	@bash scripts/services.sh
	@bash scripts/monitoring-tools.sh
	$(VENV_PY) tools/gen_proto.py --check
	$(MAKE) --no-print-directory lint
	$(MAKE) --no-print-directory docs
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

docs: $(INSTALL_STAMP) ## The documentation site into build/site (mkdocs, --strict: a broken link fails)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

test-fast: $(INSTALL_STAMP) ## The unit tier only (a few seconds, no services), while editing
	$(VENV_PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# Shuffled within each tier and the tiers in a shuffled order; the fault tier is left out (its
# tests own their processes). SEED=n repeats an order; the seed is printed either way.
test-shuffled: $(INSTALL_STAMP) ## The suite but the fault tier in a shuffled order (SEED=n to repeat one)
	@bash scripts/services.sh
	@bash scripts/monitoring-tools.sh
	$(VENV_PY) -m pytest -p no:cacheprovider --random-order-bucket=package $(if $(SEED),--random-order-seed=$(SEED),--random-order) tests/unit tests/migrations tests/integration tests/e2e tests/clients tests/deploy $(PYTEST_ARGS)

run: $(RUN_STAMP) ## Install what serving needs, then serve on the embedded SQLite default
	@$(VENV)/bin/runsvc serve

migrate: $(INSTALL_STAMP) ## Apply the database migrations
	$(VENV)/bin/runsvc migrate

bench: $(INSTALL_STAMP) services ## Benchmark on the local PostgreSQL, --workers 2 against 1 included; JSON to bench/results/ (BENCH_ARGS=...)
	$(VENV_PY) -m bench.run $(BENCH_ARGS)

demo: $(INSTALL_STAMP) ## The report's three scenarios: server kill -9, worker crash, force cancel (about a minute)
	$(VENV_PY) scripts/demo.py

dist: $(INSTALL_STAMP) ## Wheels and sdists of runsvc and runsvc-client in dist/, checked by twine
	rm -rf dist
	PYTHON=$(VENV_PY) sh scripts/dist.sh dist
	$(VENV)/bin/twine check --strict dist/*

image: ## Build the container image runsvc:$(VERSION) (needs a Docker engine)
	docker build -t runsvc:$(VERSION) .

clean: ## Remove the venv, node_modules and caches
	rm -rf $(VENV) node_modules build dist .pytest_cache .ruff_cache .mypy_cache
	find . -name __pycache__ -type d -prune -not -path './.git/*' -exec rm -rf {} +
	find . -name '*.egg-info' -type d -prune -not -path './.git/*' -exec rm -rf {} +

monitoring-tools: ## Install promtool and amtool (Debian packages) if missing
	@bash scripts/monitoring-tools.sh

bench-metrics: $(INSTALL_STAMP) ## Scrape /metrics with 100,000 runs in a fresh PostgreSQL database
	@bash scripts/services.sh
	$(VENV_PY) tools/bench_metrics.py $(BENCH_ARGS)

bench-profile: $(INSTALL_STAMP) services ## Where a call's server CPU goes (py-spy), per path; JSON to bench/results/profile.json
	$(VENV_PY) -m bench.profile $(BENCH_ARGS)

bench-history: $(INSTALL_STAMP) services ## Benchmark with 10k and 1M historical runs side by side (~10 min)
	$(VENV_PY) -m bench.history $(BENCH_ARGS)

bench-soak: $(INSTALL_STAMP) services ## The benchmark plus 10 minutes of heartbeats, server RSS sampled
	$(VENV_PY) -m bench.run --soak 600 --output bench/results/soak.json $(BENCH_ARGS)

bench-pg: $(INSTALL_STAMP) services ## PostgreSQL's heartbeat write budget: rows/s and WAL bytes per batch size
	$(VENV_PY) -m bench.pg_budget --output bench/results/pg_budget.json $(BENCH_ARGS)

.PHONY: test-faults
test-faults: $(INSTALL_STAMP) ## Full fault suite: 20 repetitions of every outage, 1,000 race rounds, 1,000 property examples
	@bash scripts/services.sh
	RUNSVC_FAULTS_FULL=1 RUNSVC_PROPERTY_EXAMPLES=1000 $(VENV_PY) -m pytest -p no:cacheprovider -rP --durations=15 tests/faults tests/integration/test_state_machine.py tests/integration/test_mass_reap.py tests/integration/test_races.py $(PYTEST_ARGS)

SOAK_SECONDS ?= 600
SOAK_RUNS ?= 1000

.PHONY: soak
soak: $(INSTALL_STAMP) services ## 1,000 runs heartbeating for 10 min through an outage a minute (SOAK_SECONDS=, SOAK_RUNS=, SOAK_ARGS=)
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_RUNS=$(SOAK_RUNS) $(VENV_PY) -m tests.faults.soak $(SOAK_ARGS)
