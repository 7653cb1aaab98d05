# fibsync: the two commands of the README are `make demo` and `make test`;
# a router gets `make install` (docs/operations.md, "Installing").
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
# where `make install` puts things (tools/router-install records them for `make uninstall`)
PREFIX   ?= /opt/fibsync
BINDIR   ?= /usr/local/bin
UNITDIR  ?= /etc/systemd/system
CONFDIR  ?= /etc/fibsync
CACHEDIR ?= /var/cache/fibsync
export PREFIX BINDIR UNITDIR CONFDIR CACHEDIR

.PHONY: bootstrap bootstrap-runtime demo test test-unit lint bench dist install uninstall clean

bootstrap:  ## development: runtime, lab and test packages, the venv .venv; quiet when all is there
	@bash .ci/bootstrap

bootstrap-runtime:  ## what a router needs to run fibsync (bcc, venv, kernel headers), nothing more
	@bash .ci/bootstrap --runtime

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

dist: bootstrap  ## sdist and wheel in dist/ (both carry bpf/ as the package fibsync.bpf)
	@$(PY) -c 'from setuptools import build_meta as b; b.build_sdist("dist"); b.build_wheel("dist")' >/dev/null
	@ls dist/fibsync-*

install: bootstrap-runtime  ## a venv at $(PREFIX) from a wheel of this checkout, the unit, the config; again to upgrade
	@bash tools/router-install install

uninstall:  ## remove what `make install` installed (after detaching the fast path)
	@bash tools/router-install uninstall

clean:
	@-$(VENV)/bin/fibsync lab down >/dev/null 2>&1
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info build dist
