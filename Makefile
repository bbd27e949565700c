# Thin wrapper: install Debian packages, configure CMake, build, test, run the demo.
#   make test   builds everything and runs every test (what CI runs)
#   make demo   the main job (for now: the smallest real end-to-end training, examples/tiny_train.sh)
BUILD   ?= build
JOBS    ?= $(shell nproc)
PACKAGES = build-essential cmake pkg-config libopenblas-openmp-dev libcjson-dev libzstd-dev libstb-dev \
           libsentencepiece-dev sentencepiece python3 python3-numpy python3-torch
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all deps build test demo clean sanitize

all: build

deps:
	@missing=""; for p in $(PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	else echo "deps: all Debian packages present"; fi

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure

demo: build
	./examples/tiny_train.sh $(BUILD)/tspeft

sanitize: deps
	cmake -S . -B build-san -DCMAKE_BUILD_TYPE=Debug -DTSPEFT_SANITIZE=ON
	cmake --build build-san -j $(JOBS)
	cd build-san && ctest --output-on-failure

clean:
	rm -rf $(BUILD) build-san
