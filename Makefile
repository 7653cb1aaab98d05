# fibsync: the two commands of the README are `make demo` and `make test`.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: bootstrap demo test test-unit lint bench clean

bootstrap:  ## install what is missing (Debian packages, kernel headers link, venv); quiet when all is there
	@bash .ci/bootstrap

demo: bootstrap  ## build the namespace lab, run fibsync on its router, show XDP forwarding
	@$(VENV)/bin/fibsync lab demo

test: bootstrap  ## the whole suite: unit, BPF (BPF_PROG_TEST_RUN) and namespace tests
	@$(PY) -m pytest

test-unit: bootstrap
	@$(PY) -m pytest tests/unit

lint: bootstrap
	@$(VENV)/bin/ruff check fibsync tests bench

bench: bootstrap  ## the benchmarks; results go to docs/benchmarks.md by hand
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	@-$(VENV)/bin/fibsync lab down >/dev/null 2>&1
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
