# The two commands of the README. TARGET=cpu|cuda|auto picks the vLLM build (default: auto).
VENV ?= .venv
PY := $(VENV)/bin/python
TARGET ?= auto
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-quick clean demo

install:
	TARGET=$(TARGET) VENV=$(abspath $(VENV)) bash scripts/install.sh

test:
	$(PY) -m pytest $(PYTEST_ARGS)

test-quick:
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info bench_results

demo:  # the browser console; DEMO_ARGS=--no-browser for the terminal demo
	$(VENV)/bin/vllm-livevlm demo $(DEMO_ARGS)
