# Thin wrapper: install Debian packages, configure CMake, build, test, run the demo.
#   make test   builds everything and runs every test (what CI runs)
#   make demo   the main job: LoRA against TS-LoRA on Fashion-MNIST images and text (examples/demo.sh)
BUILD   ?= build
JOBS    ?= $(shell nproc)
PACKAGES = build-essential cmake pkg-config libopenblas-openmp-dev libcjson-dev libzstd-dev libstb-dev \
           libsentencepiece-dev sentencepiece python3 python3-numpy python3-torch \
           python3-sentencepiece python3-pil dataset-fashion-mnist zlib1g-dev libopenmpi-dev openmpi-bin
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
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DTSPEFT_MPI=ON

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

test: build
	cd $(BUILD) && ctest --output-on-failure

demo: build
	./examples/demo.sh $(BUILD)/tspeft runs/demo

sanitize: deps
	cmake -S . -B build-san -DCMAKE_BUILD_TYPE=Debug -DTSPEFT_SANITIZE=ON
	cmake --build build-san -j $(JOBS)
	cd build-san && ctest --output-on-failure -LE study

clean:
	rm -rf $(BUILD) build-san

# ---- fuzzing (tests/fuzz, docs/bad-input.md) ---------------------------------------------------------
#   make fuzz [FUZZ_SECONDS=60] [FUZZ_TARGETS="safetensors jsonl"]
# Builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined) in $(FUZZ_BUILD), then
# runs each for FUZZ_SECONDS, starting from a scratch copy of its committed corpus (tests/fuzz/corpus is
# never modified). Fails if any target crashes, leaks, times out or runs out of memory; the input that
# did it is left in $(FUZZ_BUILD)/fuzz-work/<target>/ (crash-*, leak-*, timeout-*, oom-*).
FUZZ_SECONDS ?= 60
FUZZ_BUILD   ?= build-fuzz
FUZZ_TARGETS ?= safetensors st_index llama_config llama_open peft_config adapter jsonl args_config shard \
                tokenizer image fmnist_images fmnist_labels llava instruct glue
FUZZ_PACKAGES = clang libclang-rt-14-dev

.PHONY: fuzz fuzz-deps fuzz-build

fuzz-deps: deps
	@missing=""; for p in $(FUZZ_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

fuzz-build: fuzz-deps
	cmake -S . -B $(FUZZ_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
	      -DCMAKE_CXX_COMPILER=clang++ -DTSPEFT_FUZZ=ON
	cmake --build $(FUZZ_BUILD) -j $(JOBS) --target $(addprefix fuzz_,$(FUZZ_TARGETS)) $(addprefix replay_,$(FUZZ_TARGETS))

fuzz: fuzz-build
	@work=$(FUZZ_BUILD)/fuzz-work; rm -rf $$work; mkdir -p $$work; failed=""; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p $$work/$$t/corpus; cp tests/fuzz/corpus/$$t/* $$work/$$t/corpus/; \
	  echo "== fuzz_$$t: $(FUZZ_SECONDS) s from $$(ls $$work/$$t/corpus | wc -l) corpus files"; \
	  OMP_NUM_THREADS=1 ASAN_OPTIONS=detect_leaks=1 \
	    $(FUZZ_BUILD)/tests/fuzz/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 \
	    -print_final_stats=1 -artifact_prefix=$$work/$$t/ $$work/$$t/corpus \
	    > $$work/$$t/log.txt 2>&1; rc=$$?; \
	  execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' $$work/$$t/log.txt); \
	  secs=$$(sed -n 's/^stat::average_exec_per_sec: *//p' $$work/$$t/log.txt); \
	  if [ $$rc -ne 0 ] || ls $$work/$$t | grep -qE '^(crash|leak|timeout|oom)-'; then \
	    failed="$$failed $$t"; echo "   FAILED (exit $$rc); log: $$work/$$t/log.txt"; \
	    ls $$work/$$t | grep -E '^(crash|leak|timeout|oom)-' | sed "s|^|   input: $$work/$$t/|"; \
	    grep -m1 -E 'ERROR: |runtime error|invariant broken' $$work/$$t/log.txt | sed 's/^/   /'; \
	  else echo "   ok: $${execs:-?} executions ($${secs:-?}/s), corpus now $$(ls $$work/$$t/corpus | wc -l) files"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed"; exit 1; fi; echo "fuzz: no crash in $(FUZZ_TARGETS)"
