# The README's commands.  `make run` starts Empath with the repo's config;
# `make test` installs everything the tests need and runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
APT_PACKAGES := postfix swaks libnet-ssleay-perl libio-socket-ssl-perl dnsmasq-base \
                prometheus prometheus-alertmanager gcc libc6-dev redis-server
# command that proves each package is present
APT_PROBES   := smtp-sink swaks dnsmasq promtool amtool gcc redis-server
# DKIM (issue 17): verifiers for the tests (Mail::DKIM, OpenDKIM) and OpenDKIM for bench/dkim
APT_PACKAGES += libmail-dkim-perl libcryptx-perl opendkim opendkim-tools openssl
APT_PROBES   += opendkim opendkim-testmsg openssl
# Modules (issue 19): rspamd as a milter in the tests and bench/modules; opendkim-genkey
APT_PACKAGES += rspamd
APT_PROBES   += rspamd opendkim-genkey
# Health (issue 14 defect 6): `ss -K` destroys the daemon's listening socket in a test
APT_PACKAGES += iproute2
APT_PROBES   += ss
# The compiled build: a wheel whose hot-path modules mypyc compiled (the list is in
# pyproject.toml; the hook is scripts/hatch_mypyc.py), installed into build/native and
# put first on PYTHONPATH by `run`, `cluster`, `bench` and the first pass of `test`.
# It is rebuilt from scratch whenever any source changes, so it is never stale; .venv
# keeps its editable, pure-Python install of src/.
NATIVE_SRC   := $(wildcard src/empath/*.py src/empath/*/*.py) scripts/hatch_mypyc.py pyproject.toml
NATIVE       := build/native/.installed
COMPILED     := PYTHONPATH=$(CURDIR)/build/native

.PHONY: run cluster test lint typecheck unit bench torture deps system-deps native clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

deps: $(VENV)/.installed

$(NATIVE): $(VENV)/.installed $(NATIVE_SRC)
	rm -rf build/dist build/native
	HATCH_BUILD_HOOKS_ENABLE=1 $(PY) -m hatchling build -t wheel -d build/dist
	$(PY) -m pip install --quiet --no-deps --target build/native build/dist/empath-*.whl
	touch $@

native: $(NATIVE)

# Without a C compiler Empath still runs (pure Python, slower): say so and go on.
run: deps
	@$(MAKE) --no-print-directory native || echo "warning: hot-path modules not compiled; running pure Python"
	$(COMPILED) $(VENV)/bin/empath --config empath.config.ron

# A local cluster (DESIGN §11): redis-server + 2 nodes sharing 127.0.0.1:1025 (reuse_port),
# files under ./cluster; NODES=3 for more.  Ctrl-C stops everything.
NODES ?= 2
cluster: system-deps deps
	@$(MAKE) --no-print-directory native || echo "warning: hot-path modules not compiled; running pure Python"
	$(COMPILED) $(PY) scripts/cluster.py --nodes $(NODES) --dir cluster

system-deps:
	@missing=""; for t in $(APT_PROBES); do \
	  command -v $$t >/dev/null 2>&1 || [ -x /usr/sbin/$$t ] || missing="$$missing $$t"; done; \
	perl -MNet::SSLeay -MIO::Socket::SSL -e1 2>/dev/null || missing="$$missing perl-tls"; \
	perl -MMail::DKIM::Verifier -MCrypt::PK::Ed25519 -e1 2>/dev/null || missing="$$missing perl-dkim"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  echo "postfix postfix/main_mailer_type select No configuration" | $$SUDO debconf-set-selections; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES); \
	fi

lint: deps
	$(VENV)/bin/ruff check src tests bench scripts bench/ingest bench/relay bench/ingest_cpu bench/relay_cpu bench/control bench/control_ops bench/cluster bench/observability bench/scrape bench/dkim bench/dkim_keyproc bench/dkim_pipeline bench/modules bench/module_calls bench/submission bench/loop_instructions bench/load_curve bench/spool_preformat bench/writer_perf
	$(VENV)/bin/ruff format --check src tests bench scripts bench/ingest bench/relay bench/ingest_cpu bench/relay_cpu bench/control bench/control_ops bench/cluster bench/observability bench/scrape bench/dkim bench/dkim_keyproc bench/dkim_pipeline bench/modules bench/module_calls bench/submission bench/loop_instructions bench/load_curve bench/spool_preformat bench/writer_perf

typecheck: deps
	$(VENV)/bin/mypy

# The whole suite on the compiled build (tests/unit/test_compiled_build.py checks that it
# is the one loaded), then the unit tests again on the pure-Python source (what a plain
# wheel ships; the integration tests already ran against the daemon once).
test: system-deps deps lint typecheck native
	$(COMPILED) EMPATH_EXPECT_COMPILED=1 $(VENV)/bin/pytest -q
	$(VENV)/bin/pytest -q tests/unit

# The unit tests alone, pure Python (seconds; no Debian tools needed).
unit: deps
	$(VENV)/bin/pytest -q tests/unit

# The torture suite at the issue's full scale (the CI-sized run is part of `make test`).
torture: system-deps deps native
	$(COMPILED) EMPATH_TORTURE=full $(VENV)/bin/pytest -s -q tests/torture

# matplotlib is a bench-only extra (charts), never a runtime dependency
bench: system-deps deps native
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(COMPILED) $(PY) bench/ingest
	$(COMPILED) $(PY) bench/relay
	$(COMPILED) $(PY) bench/control
	$(COMPILED) $(PY) bench/cluster
	$(COMPILED) $(PY) bench/observability
	$(COMPILED) $(PY) bench/scrape
	$(COMPILED) $(PY) bench/modules
	$(COMPILED) $(PY) bench/module_calls
	$(COMPILED) $(PY) bench/submission
	$(PY) bench/charts.py

clean:
	rm -rf $(VENV) spool .pytest_cache .mypy_cache .ruff_cache build
