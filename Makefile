# The two set-up commands of the README:
#   make bench  -- install, build, and run the main job (python -m benchmarks.throughput)
#   make test   -- install, build, and run the test suite (CPU; GPU tests run where a GPU is)
PYTHON ?= python3

.PHONY: install bench test micro

install:
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	@mkdir -p build
	$(PYTHON) -m pip install --no-build-isolation -v -e . > build/install.log 2>&1 || (tail -60 build/install.log; exit 1)
	@grep -m1 -oE "qrlora_kernels: building .*" build/install.log || true
	$(PYTHON) -c "import qrlora_kernels as q; print('qrlora_kernels extension:', q.build_info())"

bench: install
	$(PYTHON) -m benchmarks.throughput

test: install
	$(PYTHON) -m pytest -q tests

micro: install
	$(PYTHON) -m pytest -q benchmarks/micro --benchmark-only
