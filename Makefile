# Two commands do everything on a fresh Debian 12 or 13 machine (as root):
#   make demo   start a local 3-node cluster on loopback addresses and show it working
#   make test   install what is needed (system packages, CRIU, the venv) and run every test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYCRIU := /usr/local/share/kerrighed/pycriu

.PHONY: install system venv native test unit cluster-test demo bench clean

install: system venv native

# The job init and shepherd, run by krgd for every job (csrc/krg-init.c; libc only).
native: kerrighed/libexec/krg-init

kerrighed/libexec/krg-init: csrc/krg-init.c | system
	mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -std=gnu11 -o $@ $<

system:
	bash scripts/install-system.sh

# The stamp is remade when the project's dependencies change; otherwise this is a no-op.
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  rm -rf "$$site/pycriu" && cp -r $(PYCRIU) "$$site/pycriu"
	touch $@

test: install
	$(PY) -m pytest -q

unit: install
	$(PY) -m pytest -q tests

cluster-test: install
	$(PY) -m pytest -q cluster_tests

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) bench/bench_cluster.py

clean:
	rm -rf $(VENV) build *.egg-info bench/results kerrighed/libexec
