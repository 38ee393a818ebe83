# make demo: set up .venv if needed, then show a compiled ResNet-18 and train fp32 vs DPC
#            (experiments/demo.py: the experiments are a package of the repository, not installed).
# make test: set up .venv if needed, then lint, type-check and run the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# mypy cannot follow setuptools' editable package-dir mapping (passes/ -> dpc_fx.passes),
# so it checks a throwaway tree of links laid out as the installed package, with the
# repository's experiments package beside it.
TYPES  := $(VENV)/typecheck

.PHONY: demo test lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m experiments.demo

lint: $(STAMP)
	$(BIN)/ruff check dpc_fx passes experiments tests tools examples
	$(BIN)/ruff format --check dpc_fx passes experiments tests tools examples

typecheck: $(STAMP)
	@rm -rf $(TYPES) && mkdir -p $(TYPES) && cp -rs $(CURDIR)/dpc_fx $(TYPES)/ \
		&& ln -s $(CURDIR)/passes $(TYPES)/dpc_fx/passes && cp -rs $(CURDIR)/experiments $(TYPES)/
	$(BIN)/mypy --config-file pyproject.toml $(TYPES)/dpc_fx $(TYPES)/experiments

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
