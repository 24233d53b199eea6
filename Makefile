# meter: set-up, run and test on a Debian 12 host (root, or sudo).
#
#   make setup   install Debian packages and the virtualenv (idempotent)
#   make run     setup, then `meter top` on this host's cgroups
#   make test    setup, then the full test suite
#   make bench   setup, then every benchmark

VENV     ?= .venv
PY       := $(VENV)/bin/python
SUDO     := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
ARCH     := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
# bcc comes from Debian (not on PyPI); headers only where the running kernel has none.
# prometheus, tmux, openvswitch-switch: end-to-end tests of the exporter, `meter top` and the demo;
# ethtool: the wire-packet test turns offloads off; systemd: systemd-analyze verifies packaging/'s units;
# chromium: the report page is loaded and drawn in a real browser.
DEB      := python3-bpfcc bpftool iproute2 python3-venv util-linux prometheus tmux openvswitch-switch ethtool systemd \
	chromium
HEADERS  := $(shell [ -d /lib/modules/$$(uname -r)/build/include ] || echo linux-headers-$(ARCH))
BENCHDEB := linux-perf iperf3 stress-ng

# The FinOps Foundation's FOCUS validator (tests/test_focus.py) needs Python >= 3.12, in a
# venv of its own: the first of these that runs is used.
FOCUSVENV := .venv-focus
FOCUSPY  ?= $(shell for p in python3.13 python3.12 $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python3 /root/.pyenv/versions/3.1[2-9]*/bin/python3 \
	/usr/local/bin/python3.1[2-9] /usr/bin/python3.1[2-9]; do \
	$$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1 && { command -v $$p; break; }; done)

.PHONY: setup deb run test test-repeat bench lint clean focus-validator

setup: deb $(VENV)/.installed focus-validator

focus-validator:
	@if [ -z "$(FOCUSPY)" ]; then echo "no Python >= 3.12 here: the FOCUS validator test will skip (fail in CI)"; \
	elif [ ! -f $(FOCUSVENV)/.installed ]; then \
	    $(FOCUSPY) -m venv $(FOCUSVENV) && \
	    $(FOCUSVENV)/bin/pip install -q 'focus-validator==2.2.1' 'pyarrow<19' && touch $(FOCUSVENV)/.installed; fi

deb:
	@missing=$$(for p in $(DEB) $(HEADERS) $(EXTRA_DEB); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

# --system-site-packages: the venv sees Debian's bcc beside pip's packages.
# constraints.txt: the versions the suite last passed with, so that a new release
# elsewhere cannot turn a fresh clone's CI red.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	[ -x $(PY) ] || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,parquet,fleet,report]'
	$(PY) -c 'import bcc, meter' && touch $@

run: setup
	$(SUDO) $(VENV)/bin/meter top

test: setup
	$(SUDO) env CI="$(CI)" $(VENV)/bin/pytest -q

# The suite N times in a row (default 10) with the host kept half busy,
# stopping at the first red run: `sudo make test-repeat N=10`.
N ?= 10
test-repeat: setup
	$(MAKE) deb EXTRA_DEB=stress-ng
	@stress-ng --cpu 2 --cpu-load 50 --timeout 0 >/dev/null 2>&1 & pid=$$!; \
	trap "kill $$pid" EXIT; \
	for i in $$(seq 1 $(N)); do echo "== run $$i of $(N)"; \
	    $(SUDO) env CI="$(CI)" $(VENV)/bin/pytest -q -p no:cacheprovider || exit 1; done

bench:
	$(MAKE) setup EXTRA_DEB="$(BENCHDEB)"
	$(SUDO) $(PY) benchmarks/run

lint: setup
	$(VENV)/bin/ruff check meter tests benchmarks examples
	$(VENV)/bin/mypy meter examples

clean:
	rm -rf $(VENV) $(FOCUSVENV) *.egg-info
