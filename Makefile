# `make serve`: install into .venv if needed, run the registry (127.0.0.1:5000, ./data).
# `make test`: install into .venv if needed, run the whole suite.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: serve test bench clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/regserve serve $(CONFIG)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

$(VENV)/.bench: $(STAMP)
	$(VENV)/bin/pip install -q -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(VENV)/bin/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
