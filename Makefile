# Two commands do everything:
#   make demo   install, then run the main job (wclust compare on the built-in default)
#   make test   install, then lint and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

# constraints.txt: the versions the tests pass with (pyproject.toml gives the ranges);
# setup.py and wclust/csrc: the compiled kernels, rebuilt by pip install -e
$(STAMP): pyproject.toml constraints.txt setup.py $(wildcard wclust/csrc/*.cpp)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

# whisper-tiny.en on every 4th built-in LibriSpeech clip (25 clips, all 10 speakers)
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/wclust compare --every 4 -o results/

lint: $(STAMP)
	$(BIN)/ruff check wclust tests benchmarks scripts
	$(BIN)/ruff format --check wclust tests benchmarks scripts
	$(BIN)/lint-imports

# two pytest workers (pytest-xdist); a test file stays on one worker, so a module's
# shared setup runs once
test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -p no:cacheprovider -n 2 --dist loadfile

clean:
	rm -rf $(VENV) results .pytest_cache
