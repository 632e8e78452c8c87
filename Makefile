# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs first
# (a .venv with the pinned torch and the project's pinned dependencies) and is a no-op set-up on a second run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here rather than in pyproject.toml so GPU users can keep their own build.
TORCH  := torch==2.14.1 torchvision==0.29.1
SETUP  := $(VENV)/.setup-done

.PHONY: setup demo test summary clean

setup: $(SETUP)

$(SETUP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(SETUP)
	$(BIN)/python -m mimbench.backbones.cli demo --out runs/demo

test: $(SETUP)
	$(BIN)/pytest

summary: $(SETUP)
	$(BIN)/python -m mimbench.backbones.cli summary

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
