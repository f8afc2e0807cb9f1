# bpstream developer and CI entry points. `make test` is the one command CI and the README use.
BIN := .venv/bin
PYTEST_ARGS ?=

UV := .venv/bin/uv

.PHONY: setup lock lint test-unit test-integration test demo servers-up servers-down servers-status

setup:  ## Install Debian packages, the Python environment and the Kafka jars (idempotent)
	bash scripts/bootstrap.sh

lock:  ## Re-resolve uv.lock from pyproject and export the images' constraints from it (then run `make test`)
	$(UV) lock $(UV_LOCK_ARGS)
	$(UV) export --frozen --no-hashes --no-emit-project --no-header --no-annotate --format requirements.txt \
		-o deploy/docker/requirements/constraints.txt

lint:  ## ruff on everything, mypy --strict on shared/ and services/
	$(BIN)/ruff check .
	$(BIN)/mypy -p bpstream.shared -p bpstream.services

test-unit:  ## Fast tests that need no server
	$(BIN)/pytest -m unit -q $(PYTEST_ARGS)

test-integration: servers-up  ## Tests against the real local Mosquitto, Kafka and InfluxDB
	$(BIN)/pytest -m integration -q $(PYTEST_ARGS)

test:  ## Everything: set-up, lint, servers, unit and integration tests, summary
	bash scripts/run_tests.sh

demo: setup  ## The end-to-end pipeline demo on the local servers
	$(BIN)/bpstream demo

servers-up:
	$(BIN)/bpstream servers up

servers-down:
	$(BIN)/bpstream servers down

servers-status:
	$(BIN)/bpstream servers status
