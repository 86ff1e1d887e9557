# Two commands do everything:
#   make demo   install, then run the main job (wclust compare on the built-in default)
#   make test   install, then lint and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean

<<<<<<< HEAD
# constraints.txt: the versions the tests pass with (pyproject.toml gives the ranges)
$(STAMP): pyproject.toml constraints.txt
=======
# setup.py and wclust/csrc: the compiled kernels, rebuilt by pip install -e
$(STAMP): pyproject.toml setup.py $(wildcard wclust/csrc/*.cpp)
>>>>>>> kernels
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/wclust compare -o results/

lint: $(STAMP)
	$(BIN)/ruff check wclust tests benchmarks scripts
	$(BIN)/ruff format --check wclust tests benchmarks scripts
	$(BIN)/lint-imports

test: $(STAMP) lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) results .pytest_cache
