# Two entry points, each installs what it needs into .venv first:
#   make demo   the tutorial in miniature, offline, on the CPU
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch (a file on this project's machines); on a GPU machine: make TORCH=torch
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test install system-deps clean

# Java runs the official COCO caption scorers (PTB tokenizer, METEOR); Chromium renders the HTML report in a test.
system-deps:
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq default-jre-headless)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	@command -v java >/dev/null || (apt-get update -qq && apt-get install -y -qq default-jre-headless)
	$(BIN)/captune demo --force

test: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
