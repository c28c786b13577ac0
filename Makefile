# recserve developer entry points.
#
#   make test        .venv (created if missing) + editable install with test extras + pytest
#   make demo        train on the bundled data, export, serve, query through the client, stop
#   make bench       all benchmarks in bench/ (installs the bench extras: torch, faiss-cpu);
#                    one at a time: make bench-kernels | bench-trainer | bench-synthetic | bench-serve
#                    | bench-grpc-stacks | bench-features | bench-swap
#   make cuda-check  builds the CUDA kernels with NVIDIA's nvcc from PyPI (no GPU needed)
#                    into a second venv and runs the kernel tests against that build
#   make go-client   Go stubs (generated, not committed) + build/go-bin/recommend; go-client-test
#   make loadtest    ghz against a live server (p50/p95/p99, RPS); ecosystem-smoke: the CI run
#                    of ghz, grpcurl, grpc-health-probe and the Go client (docs/clients.md)
#
# RECSERVE_CUDA=AUTO|ON|OFF picks the CUDA build for `make test` (default AUTO:
# CUDA kernels only when nvcc is found); RECSERVE_FRONTEND=AUTO|ON|OFF the native gRPC
# front end (default AUTO: built when gRPC C++ is found; ON: required, and its tests too).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CUDA_VENV ?= .venv-cuda
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_PIP := $(CUDA_PY) -m pip --disable-pip-version-check
PYTEST_ARGS ?=
NATIVE_SOURCES := CMakeLists.txt pyproject.toml $(shell find csrc kernels/cuda proto -type f 2>/dev/null)

.PHONY: test demo bench bench-deps bench-kernels bench-trainer bench-synthetic bench-serve bench-grpc-stacks bench-features bench-swap cuda-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Build deps live in the venv and the install skips build isolation, so a
# rebuild after editing C++ is incremental (build/<wheel tag>) and takes seconds.
# gRPC C++ (Debian's libgrpc++-dev) for the native front end, installed if missing unless
# RECSERVE_FRONTEND=OFF; with AUTO the build goes on without it where apt cannot install it.
$(VENV)/.installed: $(PY) $(NATIVE_SOURCES)
	if [ "$$(echo "$${RECSERVE_FRONTEND:-AUTO}" | tr a-z A-Z)" != OFF ] && ! pkg-config --exists grpc++ 2>/dev/null; then \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    { $$SUDO apt-get install -y -q libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc \
	      || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q libgrpc++-dev libprotobuf-dev protobuf-compiler-grpc; }; } \
	    || echo "recserve: could not install gRPC C++; building without the native front end"; \
	fi
	$(PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja "grpcio-tools>=1.85.1,<1.86"
	$(PIP) install -q --no-build-isolation -e ".[test,trainer,gpu-torch]"
	touch $@

# NVIDIA's tritonclient in its own venv (it pins protobuf < 7; recserve's stubs need >= 7):
# tests/server/test_kserve_tritonclient.py runs it against a live server as an external client.
TRITONCLIENT_VENV ?= .venv-tritonclient
$(TRITONCLIENT_VENV)/.installed: tests/compat/tritonclient-requirements.txt
	test -x $(TRITONCLIENT_VENV)/bin/python || $(PYTHON) -m venv $(TRITONCLIENT_VENV)
	$(TRITONCLIENT_VENV)/bin/python -m pip install -q --disable-pip-version-check -r tests/compat/tritonclient-requirements.txt
	touch $@

test: $(VENV)/.installed $(TRITONCLIENT_VENV)/.installed
	$(PY) -m pytest $(PYTEST_ARGS)

# Train on ../shared/data/online-retail, export, serve, query through the client, stop.
demo: $(VENV)/.installed
	rm -rf build/demo
	$(PY) -m recserve.cli demo --work build/demo

bench: bench-kernels bench-trainer bench-synthetic bench-serve bench-swap bench-grpc-stacks bench-features

bench-deps: $(VENV)/.installed
	$(PIP) install -q --no-build-isolation -e ".[bench,trainer]"

bench-kernels: bench-deps
	$(PY) bench/kernels.py

bench-trainer: bench-deps
	$(PY) bench/trainer.py

bench-synthetic: bench-deps
	$(PY) bench/synthetic_scale.py

# Triton (nvidia-pytriton) needs numpy<2 and protobuf<7: its own venv, which reuses the
# editable recserve of .venv through a .pth (see bench/serve_triton.py).
TRITON_VENV ?= .venv-triton
$(TRITON_VENV)/.installed: bench/triton-requirements.txt $(VENV)/.installed
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q -r bench/triton-requirements.txt
	finder=$$(ls $(CURDIR)/$(VENV)/lib/python3*/site-packages/_editable_skbc_recserve.py); \
	site=$$($(TRITON_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))"); \
	echo "import importlib.util as _u; _s = _u.spec_from_file_location('_editable_skbc_recserve', '$$finder'); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); del _u, _s, _m" \
	    > $$site/_recserve_from_main_venv.pth
	touch $@

bench-serve: bench-deps $(TRITON_VENV)/.installed
	$(PY) bench/serve.py --triton-python $(TRITON_VENV)/bin/python

# Recommend p50/p99 in steady state vs while a 1M-item version swaps in (bench-serve's model cache).
bench-swap: bench-deps
	$(PY) bench/swap.py

# The bare gRPC floor (aio and sync) under this venv's grpcio and under grpcio 1.66.
GRPC166_VENV ?= .venv-grpc166
$(GRPC166_VENV)/.installed:
	test -x $(GRPC166_VENV)/bin/python || $(PYTHON) -m venv $(GRPC166_VENV)
	$(GRPC166_VENV)/bin/python -m pip install -q "grpcio==1.66.2"
	touch $@

bench-grpc-stacks: bench-deps $(GRPC166_VENV)/.installed
	$(PY) bench/grpc_stacks.py run --other-python $(GRPC166_VENV)/bin/python

# The LMDB feature store vs a real Redis server (Debian's redis-server, installed if missing).
bench-features: bench-deps
	command -v redis-server >/dev/null 2>&1 || { \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -q && $$SUDO apt-get install -y -q redis-server; }
	$(PY) bench/features.py

# A non-editable wheel built with RECSERVE_CUDA=ON in its own venv: proves every
# CUDA source compiles, that `pip install .` works, and that the CUDA-enabled
# module imports and passes the suite on a machine without a GPU or driver.
cuda-check:
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PIP) install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja "grpcio-tools>=1.85.1,<1.86" \
	    nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl
	NVCC=$$($(CUDA_PY) -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu13', 'bin', 'nvcc'))"); \
	RECSERVE_CUDA=ON RECSERVE_FRONTEND=OFF $(CUDA_PIP) install -q --no-build-isolation -Cbuild-dir=build/cuda-check \
	    -Ccmake.define.CMAKE_CUDA_COMPILER=$$NVCC ".[test]"
	RECSERVE_EXPECT_CUDA_BUILD=1 $(CUDA_PY) -m pytest tests/kernels $(PYTEST_ARGS)

clean:
	rm -rf build dist $(VENV) $(CUDA_VENV) $(TRITON_VENV) $(GRPC166_VENV) $(TRITONCLIENT_VENV) .pytest_cache clients/go/gen

# ---- Go client, ghz load tests, ecosystem smoke ----------------------------------------
# Go tools are installed at pinned versions into build/go-bin (GOBIN); a stamp per
# tool@version reinstalls one whose pin changes. The Go stubs are generated at build
# time into clients/go/gen (gitignored), like the Python ones.
GO ?= go
GO_BIN := build/go-bin
GO_TOOL_protoc-gen-go := google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GO_TOOL_protoc-gen-go-grpc := google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
GO_TOOL_ghz := github.com/bojand/ghz/cmd/ghz@v0.120.0
GO_TOOL_grpcurl := github.com/fullstorydev/grpcurl/cmd/grpcurl@v1.9.4
GO_TOOL_grpc-health-probe := github.com/grpc-ecosystem/grpc-health-probe@v0.4.63
go_tool = $(GO_BIN)/.tools/$(notdir $(GO_TOOL_$(1)))
GO_CLIENT := clients/go
GO_PROTOS := $(sort $(wildcard proto/recserve/v1/*.proto))
GO_STUBS_PKG := github.com/recserve/recserve/clients/go/gen/recserve/v1;recservev1
GO_STUB_OPTS := $(foreach p,$(GO_PROTOS:proto/%=%),'--go_opt=M$(p)=$(GO_STUBS_PKG)' '--go-grpc_opt=M$(p)=$(GO_STUBS_PKG)')

.PHONY: go-client go-client-test loadtest ecosystem-smoke

$(GO_BIN)/.tools/%:
	GOBIN=$(CURDIR)/$(GO_BIN) GOTOOLCHAIN=local $(GO) install $(GO_TOOL_$(firstword $(subst @, ,$*)))
	@mkdir -p $(@D) && touch $@

# The proto files carry no go_package: protoc's M options map each file to the package.
$(GO_CLIENT)/gen/.stamp: $(GO_PROTOS) $(VENV)/.installed $(call go_tool,protoc-gen-go) $(call go_tool,protoc-gen-go-grpc)
	rm -rf $(GO_CLIENT)/gen && mkdir -p $(GO_CLIENT)/gen
	$(PY) -m grpc_tools.protoc -I proto \
	    --plugin=protoc-gen-go=$(GO_BIN)/protoc-gen-go --plugin=protoc-gen-go-grpc=$(GO_BIN)/protoc-gen-go-grpc \
	    --go_out=$(GO_CLIENT)/gen --go_opt=paths=source_relative \
	    --go-grpc_out=$(GO_CLIENT)/gen --go-grpc_opt=paths=source_relative \
	    $(GO_STUB_OPTS) $(GO_PROTOS:proto/%=%)
	touch $@

go-client: $(GO_CLIENT)/gen/.stamp
	cd $(GO_CLIENT) && GOTOOLCHAIN=local $(GO) build -o $(CURDIR)/$(GO_BIN)/recommend ./cmd/recommend

# Unit tests of the example command against an in-process Go server (the live-server
# run is part of ecosystem-smoke).
go-client-test: $(GO_CLIENT)/gen/.stamp
	cd $(GO_CLIENT) && GOTOOLCHAIN=local $(GO) vet ./... && GOTOOLCHAIN=local $(GO) test ./...

# ghz against `recserve serve` on a synthetic 10k-item model (built once into build/loadtest):
# Recommend and BatchRecommend, p50/p95/p99 and RPS. LOADTEST_ARGS: e.g. --concurrency 64.
LOADTEST_ARGS ?=
loadtest: $(VENV)/.installed $(call go_tool,ghz)
	$(PY) clients/ghz/loadtest.py $(LOADTEST_ARGS)

# CI: one server; a bounded ghz run (2,000 Recommend + 200 BatchRecommend, any error fails),
# grpcurl list/describe, grpc-health-probe, the Go example command.
ecosystem-smoke: $(VENV)/.installed go-client go-client-test $(call go_tool,ghz) $(call go_tool,grpcurl) $(call go_tool,grpc-health-probe)
	$(PY) clients/ghz/loadtest.py --smoke
