# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs first
# (a .venv with the pinned torch and the project's pinned dependencies) and is a no-op set-up on a second run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here rather than in pyproject.toml so GPU users can keep their own build.
TORCH  := torch==2.14.1 torchvision==0.29.1
SETUP  := $(VENV)/.setup-done
# Test processes (pytest-xdist): one per core of this 2-core machine, each on one thread (tests/conftest.py).
TEST_JOBS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_JOBS) --dist worksteal

.PHONY: setup demo test test-fast lint regression regression-update tables landscape ablations summary clean

setup: $(SETUP)

$(SETUP): pyproject.toml transfer/install_frameworks.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,coco,ade20k]'
	transfer/install_frameworks.sh $(BIN)/python
	touch $@

# The whole chain on the embedded data (python -m mimbench.chain, see chain.py): backbone summary and a checkpoint
# round trip; MAE, RC-MAE and MixedAE pretraining of the same small ViT on the bundled photos; each encoder
# linear-probed and fine-tuned on the bundled digits, trained and evaluated with Mask R-CNN (Detectron2) on the
# generated COCO-format scenes and UperNet (mmsegmentation) on the ADE-format ones; then the tables. A second run
# reuses every finished step; `make demo FRESH=1` starts over.
demo: $(SETUP)
	$(BIN)/python -m mimbench.chain demo $(if $(FRESH),--fresh)

# The chain at CI size, compared with regression/baseline.json (tolerances from the measured seed-to-seed
# spread: `python -m mimbench.chain spread`); `make regression DATA_ROOT=/datasets` runs the small real subsets.
regression: $(SETUP)
	$(BIN)/python -m mimbench.chain regression $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

regression-update: $(SETUP)
	$(BIN)/python -m mimbench.chain regression --update $(if $(DATA_ROOT),--data-root $(DATA_ROOT))

# The MixedAE poster's ablations and analysis at CPU scale (python -m mimbench.chain ablations, see chain.py): MixedAE
# pretraining per configuration (objective, segment embeddings, homologous attention), each probed on the digits and
# the embedded COCO / ADE sets and tagged for `make tables`, and the homo_acc figure over two seeds, in runs/ablations.
ablations: $(SETUP)
	$(BIN)/python -m mimbench.chain ablations $(if $(FRESH),--fresh)

test: $(SETUP)
	$(PYTEST)

# The developer loop: everything but the end-to-end runs (tests marked `slow`), a few minutes.
test-fast: $(SETUP)
	$(PYTEST) -m "not slow"

lint: $(SETUP)
	$(BIN)/ruff check .

# The paper's tables from the results store (results/results.jsonl or $$MIMBENCH_RESULTS) into tables/out/.
tables: $(SETUP)
	$(BIN)/python -m mimbench.tables.build

# The loss-landscape study at CPU scale (python -m mimbench.landscape.study, see landscape/study.py): MAE, RC-MAE
# and a supervised ViT of one small arch and budget, their pretraining, linear-probe and reconstruction landscapes
# at two seeds of the directions, the figures and the landscape tables; a second run reuses every finished step.
landscape: $(SETUP)
	$(BIN)/python -m mimbench.landscape.study

summary: $(SETUP)
	$(BIN)/python -m mimbench.backbones.cli summary

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
