# Two commands do everything on a fresh Debian 12 or 13 machine (as root):
#   make demo   start a local 3-node cluster on loopback addresses and show it working
#   make test   install what is needed (system packages, CRIU, the venv) and run every test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYCRIU := /usr/local/share/kerrighed/pycriu

.PHONY: install system venv native test unit cluster-test demo bench clean

install: system venv native

# The job init and shepherd, run by krgd for every job (csrc/krg-init.c; libc only), and KDFS's
# CRC32C (csrc/crc32c.c through cffi: kdfs/_crc32c<suffix>.so; its leftovers go to build/crc32c).
CRC32C_SO := kdfs/_crc32c$(shell p=$(PY); test -x $$p || p=$(PYTHON); \
	$$p -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)

native: kerrighed/libexec/krg-init $(CRC32C_SO)

kerrighed/libexec/krg-init: csrc/krg-init.c | system
	mkdir -p $(dir $@)
	$(CC) -O2 -Wall -Wextra -Werror -std=gnu11 -o $@ $<

$(CRC32C_SO): csrc/crc32c.c kdfs/_crc32c_build.py | venv
	$(PY) kdfs/_crc32c_build.py

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
	rm -rf $(VENV) build *.egg-info bench/results kerrighed/libexec kdfs/_crc32c.*.so kdfs/_crc32c.c kdfs/_crc32c.o
