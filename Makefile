# make demo: set up .venv if needed, then show a compiled ResNet-18 and train fp32 vs DPC.
# make test: set up .venv if needed, then lint, type-check and run the test suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# mypy cannot follow setuptools' editable package-dir mapping (passes/ -> dpc_fx.passes),
# so it checks a throwaway tree of links laid out as the installed package.
TYPES  := $(VENV)/typecheck

.PHONY: demo test lint typecheck clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dpc-fx demo

lint: $(STAMP)
	$(BIN)/ruff check dpc_fx passes tests tools examples
	$(BIN)/ruff format --check dpc_fx passes tests tools examples

typecheck: $(STAMP)
	@rm -rf $(TYPES) && mkdir -p $(TYPES) && cp -rs $(CURDIR)/dpc_fx $(TYPES)/ \
		&& ln -s $(CURDIR)/passes $(TYPES)/dpc_fx/passes
	$(BIN)/mypy --config-file pyproject.toml $(TYPES)/dpc_fx

test: lint typecheck
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
