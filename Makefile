# The commands a newcomer needs. Everything runs from a local virtualenv (.venv)
# that the first target to need it creates: no global installs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-stamp
SOURCES = pyproject.toml setup.py $(wildcard proto/sovereign/v1/*.proto) $(wildcard src/sovereign/_fast/*.pyx) $(wildcard src/sovereign/_fast/*.pxd)
ARGS   ?=

.PHONY: install serve test test-postgres test-slow test-fast lint typecheck bench bench-compare bench-instructions bench-instructions-update profile clean web soak

$(STAMP): $(SOURCES)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

## serve: run the server on the embedded default (SQLite under ./data)
serve: $(STAMP)
	$(BIN)/sovereign serve $(ARGS)

## test: lint, type-check and the whole test suite (what CI runs); every async test
## runs on uvloop and again on the stdlib event loop (SOVEREIGN_TEST_LOOP=both; once for
## the tests marked server_in_subprocess: their servers run uvloop in any case)
TEST_LOOP ?= both
test: $(STAMP) interop web-deps lint typecheck
	$(MAKE) --no-print-directory fuzz FUZZ_SECONDS=30
	SOVEREIGN_TEST_LOOP=$(TEST_LOOP) $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" $(ARGS)
	$(MAKE) --no-print-directory test-postgres

## test-postgres: the storage tests and the integration suite with every test server on
## a throwaway PostgreSQL database (local server, 127.0.0.1:5432, user postgres), uvloop
# Tests whose storage SOVEREIGN_TEST_STORAGE does not choose (the cluster and its admin
# state, the workers, the Redis bus, the migration: PostgreSQL always; the load tool:
# the servers it spawns itself) already ran in the main pass: not twice.
PG_ONLY_ONCE = --ignore=tests/integration/test_cluster.py --ignore=tests/integration/test_workers.py \
  --ignore=tests/integration/test_redis_bus.py --ignore=tests/integration/test_redis_nodes.py \
  --ignore=tests/integration/test_postgres_migration.py \
  --ignore=tests/integration/test_cluster_admin.py --ignore=tests/integration/test_bench_tool.py
test-postgres: $(STAMP)
	SOVEREIGN_TEST_LOOP=uvloop SOVEREIGN_TEST_STORAGE=postgres $(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests/unit/storage tests/integration $(PG_ONLY_ONCE) $(PG_ARGS)

## test-slow: the long matrix runs (storms of 1,000 per kind, 1,000 slowloris sockets,
## 10,000 garbage envelopes), on uvloop
test-slow: $(STAMP)
	SOVEREIGN_TEST_LOOP=uvloop $(BIN)/python -m pytest -q -p no:cacheprovider -m slow $(ARGS)

test-fast: $(STAMP) interop web-deps
	$(BIN)/python -m pytest -q -x -m "not slow" $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: microbenchmarks, saved under .benchmarks/
bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-autosave $(ARGS)

## bench-compare: fail if a benchmark regressed more than 10% against the last saved run
bench-compare: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-compare --benchmark-compare-fail=mean:10% $(ARGS)

## bench-instructions: instruction counts (valgrind callgrind) of fixed work — sends one
## commit each, sends 50 per commit, acks alone and riding with the next send, fan-out
## deliveries — against the baseline in
## benchmarks/instructions.json; fails when a count rose > 5% (noise-free; CI runs it)
INSTRUCTIONS = benchmarks/instructions.json
bench-instructions: $(STAMP)
	$(BIN)/python -m benchmarks.instructions --check $(INSTRUCTIONS) $(ARGS)

## bench-instructions-update: store the current counts as the new baseline
bench-instructions-update: $(STAMP)
	$(BIN)/python -m benchmarks.instructions --update $(INSTRUCTIONS) $(ARGS)

## load: a load scenario against a spawned server (SCENARIO=relay|fanout|resume|idle|mixed),
## JSON in .benchmarks/load-$(SCENARIO).json; e.g. make load SCENARIO=fanout ARGS="--duration 20"
SCENARIO ?= relay
PROFILE  ?= profile.svg
.PHONY: load
load: $(STAMP)
	@mkdir -p .benchmarks
	$(BIN)/sovereign-bench $(SCENARIO) --json .benchmarks/load-$(SCENARIO).json $(ARGS)

## profile: py-spy record of the server during a scenario (PROFILE=profile.svg flame graph;
## PROFILE=profile.txt: raw stacks + a top-functions summary); needs ptrace (root in CI)
profile: $(STAMP)
	@test -x $(BIN)/py-spy || { echo "py-spy is missing: it comes with the dev extras (make install)"; exit 1; }
	$(BIN)/sovereign-bench $(SCENARIO) --profile $(PROFILE) $(ARGS)

## fuzz: atheris over tests/fuzz/fuzz_protocol.py (frames, envelope, dispatch, payloads,
## MLS reader) for FUZZ_SECONDS (default 600 = 10 minutes; CI runs 30 s: `make test`
## ends with it); corpus and any crash input under .artifacts/fuzz/
FUZZ_SECONDS ?= 600
.PHONY: fuzz
fuzz: $(STAMP)
	@mkdir -p .artifacts/fuzz/corpus
	$(BIN)/python -m tests.fuzz.fuzz_protocol .artifacts/fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.artifacts/fuzz/ -print_final_stats=1

## soak: SOAK_CLIENTS clients x 1 msg/s with acks for SOAK_MINUTES against a spawned
## server; RSS slope and fd counts on stdout and in .artifacts/soak.json
SOAK_CLIENTS ?= 200
SOAK_MINUTES ?= 5
soak: $(STAMP)
	$(BIN)/python benchmarks/soak.py --clients $(SOAK_CLIENTS) --minutes $(SOAK_MINUTES) --out .artifacts/soak.json

clean:
	rm -rf build $(VENV) src/sovereign/_fast/*.c src/sovereign/_fast/*.so src/sovereign/v1/*_pb2.py*

## interop: install the Node.js MLS interop client (npm ts-mls) that
## tests/integration/test_mls_interop.py drives; skipped while up to date
INTEROP = interop/ts-mls
.PHONY: interop
interop: $(INTEROP)/node_modules/.installed-stamp

$(INTEROP)/node_modules/.installed-stamp: $(INTEROP)/package.json $(INTEROP)/package-lock.json
	cd $(INTEROP) && npm ci --no-audit --no-fund
	@touch $@

## web: rebuild the browser client (web/, TypeScript + ts-mls) into
## src/sovereign/webclient with the pinned bundler; the built files are committed, so
## `make serve` needs no Node. Same sources and lock file => the same bytes.
WEB = web
.PHONY: web-deps
web-deps: $(WEB)/node_modules/.installed-stamp

web: web-deps
	cd $(WEB) && npx tsc --noEmit -p . && node build.mjs

$(WEB)/node_modules/.installed-stamp: $(WEB)/package.json $(WEB)/package-lock.json
	cd $(WEB) && npm ci --no-audit --no-fund
	@touch $@
