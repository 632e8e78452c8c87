# The two commands of the README: `make demo` and `make test`. Each sets up everything it needs first
# (a .venv with the pinned torch and the project's pinned dependencies) and is a no-op set-up on a second run.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned here rather than in pyproject.toml so GPU users can keep their own build.
TORCH  := torch==2.14.1 torchvision==0.29.1
SETUP  := $(VENV)/.setup-done

.PHONY: setup demo test tables summary clean

setup: $(SETUP)

$(SETUP): pyproject.toml transfer/install_frameworks.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,coco,ade20k]'
	transfer/install_frameworks.sh $(BIN)/python
	touch $@

# Backbones and the loader, then MAE, RC-MAE and MixedAE pretraining of the same small ViT on the bundled
# photos (3 epochs each, a few minutes on a CPU), each exported encoder read back through the loader,
# linear-probed on the bundled digits into a results store; the MixedAE encoder then trains and evaluates
# Mask R-CNN (Detectron2) and UperNet (mmsegmentation) on the generated COCO- and ADE-format scenes; the
# paper's tables are built from the store. A second run reuses the finished runs (and cached probe features).
DEMO_METHODS := mae rcmae mixedae

demo: $(SETUP)
	$(BIN)/python -m mimbench.backbones.cli demo --out runs/demo
	@for method in $(DEMO_METHODS); do \
	  $(BIN)/python pretrain/run.py --method $$method --embedded --epochs 3 --out runs/demo/$$method || exit 1; \
	  $(BIN)/python -m mimbench.backbones.cli inspect runs/demo/$$method/encoder.safetensors || exit 1; \
	done
	@for method in $(DEMO_METHODS); do \
	  $(BIN)/python transfer/run.py digits --ckpt runs/demo/$$method/encoder.safetensors \
	    --results runs/demo/results.jsonl --cache-dir runs/demo/feature_cache || exit 1; \
	done
	test -f runs/demo/coco/mixedae/model_final.pth || $(BIN)/python transfer/run.py coco --embedded \
	  --ckpt runs/demo/mixedae/encoder.safetensors --out runs/demo/coco/mixedae --results runs/demo/results.jsonl \
	  --resume
	test -f runs/demo/ade20k/mixedae/train_loss.json || $(BIN)/python transfer/run.py ade20k --embedded \
	  --ckpt runs/demo/mixedae/encoder.safetensors --out runs/demo/ade20k/mixedae --results runs/demo/results.jsonl
	$(BIN)/python -m mimbench.tables.build --store runs/demo/results.jsonl --out runs/demo/tables
	@echo "Pretraining runs: runs/demo/<method>/ with checkpoints/, encoder.safetensors, cost.json, tensorboard/, figures/"
	@echo "Digits linear probes: runs/demo/results.jsonl; tables: runs/demo/tables/"
	@echo "Mask R-CNN on the embedded COCO-format scenes: runs/demo/coco/mixedae/ (visualizations/, metrics.json)"
	@echo "UperNet on the embedded ADE-format scenes: runs/demo/ade20k/mixedae/ (overlays/, train_loss.json)"

test: $(SETUP)
	$(BIN)/pytest

# The paper's tables from the results store (results/results.jsonl or $$MIMBENCH_RESULTS) into tables/out/.
tables: $(SETUP)
	$(BIN)/python -m mimbench.tables.build

summary: $(SETUP)
	$(BIN)/python -m mimbench.backbones.cli summary

clean:
	rm -rf $(VENV) runs .pytest_cache build *.egg-info
