# The two commands: `make demo` and `make test`. Both bootstrap .venv on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

# mypy, strict, over the contracts and the pure cores (pyproject.toml [tool.mypy] says why these).
MYPY_TARGETS := -p edgefleet.protos -m edgefleet.common.errors -m edgefleet.common.fsutil -m edgefleet.common.backoff \
	-m edgefleet.edge_agent.reconcile -m edgefleet.edge_agent.lifecycle -m edgefleet.edge_agent.records
# The folders install as edgefleet.<name> through setuptools' package_dir, which static tools cannot follow through
# an editable install: mypy reads them through a tree of links named as they install.
TYPECHECK := $(VENV)/typecheck
ROOTS := common cloud edge_agent fleet protos

.PHONY: demo test venv bench clean lint check-py310

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch stays out of issue-2 installs; the dev extra pulls scikit-learn and skl2onnx for the demo teacher.
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits/demo.py

# The lint gate runs first: a test run on code that does not lint is not a green run.
test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	@mkdir -p $(TYPECHECK)/edgefleet
	@for r in $(ROOTS); do ln -sfn "$(CURDIR)/$$r" "$(TYPECHECK)/edgefleet/$$r"; done
	cd $(TYPECHECK) && MYPYPATH=$(CURDIR)/$(TYPECHECK) $(CURDIR)/$(VENV)/bin/mypy \
		--config-file $(CURDIR)/pyproject.toml --python-executable $(CURDIR)/$(PY) $(MYPY_TARGETS)

bench: $(STAMP)
	$(PY) bench/inference.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# The agent and the CLI on Python 3.10 (Jetson images on Ubuntu 22.04): a plain, non-editable install of
# '.[agent,cli]' in its own venv, then the agent's and the CLI's tests that need no cloud. Not part of `make test`
# (it downloads the agent's wheels for 3.10); run it when touching the agent's or CLI's imports.
PY310 ?= python3.10  # e.g. make check-py310 PY310=~/.pyenv/versions/3.10.13/bin/python3.10
PY310_TESTS := tests/edge_agent tests/common/test_fsutil.py tests/common/test_runtime_onnx.py tests/common/test_dsse.py \
	tests/fleet/test_config.py \
	tests/test_layering.py
check-py310:
	$(PY310) -m venv .venv310
	.venv310/bin/python -m pip install --quiet '.[agent,cli,litert]' pytest pytest-timeout onnx
	cd /tmp && $(CURDIR)/.venv310/bin/python -c "import sys, edgefleet.edge_agent.main, edgefleet.fleet.config; print('imports on', sys.version.split()[0])"
	.venv310/bin/python -m pytest -q -p no:cacheprovider $(PY310_TESTS) \
		--ignore tests/edge_agent/test_trust.py --ignore tests/edge_agent/test_unpack.py \
		--ignore tests/edge_agent/test_daemon.py
