# The two commands that matter: `make demo` (whole pipeline on Fashion-MNIST) and `make test` (`make lint` first in CI).
# Both create .venv and install everything on first use; re-running them skips what is done.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ldae-installed
DEMO ?= runs/demo
FMNIST_DEB := /usr/share/datasets/fashion-mnist
COCO_MINI ?= ../shared/data/coco-mini.tar.gz

.PHONY: env data demo test lint bench clean-demo

env: $(STAMP)

$(STAMP): pyproject.toml requirements/detectron2.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test,detect]"
	SP=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	$(BIN)/pip install -q --upgrade --no-deps --only-binary=:all: --python-version 3.10 --target "$$SP" \
		--require-hashes -r requirements/detectron2.txt && \
	rm -f "$$SP"/detectron2/_C.cpython-310-*.so
	$(BIN)/python -c "from ldae_cli.model.detection import require_detectron2; require_detectron2()"
	touch $@

# Fashion-MNIST for the demo: the Debian package, else torchvision's download into ~/.cache/ldae.
data: env
	@if [ -f $(FMNIST_DEB)/train-images-idx3-ubyte.gz ]; then echo "Fashion-MNIST: $(FMNIST_DEB)"; \
	elif command -v apt-get >/dev/null 2>&1 && { SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n"); \
		$$SUDO apt-get install -y -q dataset-fashion-mnist || { $$SUDO apt-get update -q && \
		$$SUDO apt-get install -y -q dataset-fashion-mnist; }; }; then echo "Fashion-MNIST installed"; \
	else $(BIN)/python -c "from ldae_cli.data.sources import download_fashion_mnist; download_fashion_mnist()"; fi

# Every stage on Fashion-MNIST. Each step is a file target, so re-running skips what is done; an
# interrupted pretrain resumes where it stopped.
demo: env data $(DEMO)/probe/results.json $(DEMO)/probe-random-init/results.json $(DEMO)/tokenizer/done \
		$(DEMO)/finetune/done $(DEMO)/detect/done $(DEMO)/denoise.png
	@echo "demo done: see $(DEMO)/ (pca.filters.png, pretrain/loss.png, probe*/results.json, denoise.png," \
		"tokenizer/reconstructions.png, finetune/accuracy.png, detect/eval.json)"

$(DEMO)/denoise.png: $(DEMO)/pretrain/done
	rm -f $@
	$(BIN)/ldae denoise --ckpt $(DEMO)/pretrain/checkpoint.safetensors --samples 512 --compare-pixel-noise --out $@

# --continue starts a run, or continues it where it stopped (a run stopped before its first checkpoint starts
# again); nothing is ever replaced with --force.
$(DEMO)/pca.safetensors: | env data
	$(BIN)/ldae fit-pca --config demo/fmnist-pca.yaml --out $@

$(DEMO)/pretrain/done: $(DEMO)/pca.safetensors
	$(BIN)/ldae pretrain --config demo/fmnist.yaml --out $(DEMO)/pretrain --continue \
		--set tokenizer.path=$(DEMO)/pca.safetensors
	touch $@

$(DEMO)/probe/results.json: $(DEMO)/pretrain/done
	rm -rf $(DEMO)/probe
	$(BIN)/ldae probe --ckpt $(DEMO)/pretrain/checkpoint.safetensors --config probe/small-fast.yaml --out $(DEMO)/probe

$(DEMO)/tokenizer/done: | env data
	$(BIN)/ldae train-tokenizer --config demo/fmnist-patch-ae.yaml --out $(DEMO)/tokenizer --continue
	touch $@

$(DEMO)/finetune/done: $(DEMO)/pretrain/done
	$(BIN)/ldae finetune --config demo/fmnist-finetune.yaml --ckpt $(DEMO)/pretrain/checkpoint.safetensors \
		--out $(DEMO)/finetune --continue
	touch $@

# COCO transfer needs COCO-layout data: the mini set beside this checkout when there is one
$(DEMO)/detect/done: $(DEMO)/pretrain/done
	if [ ! -f $(COCO_MINI) ]; then echo "detect: skipped, no $(COCO_MINI)"; \
	else mkdir -p $(DEMO) && tar xzf $(COCO_MINI) -C $(DEMO) && \
		$(BIN)/ldae detect --config demo/coco-mini-detect.yaml --ckpt $(DEMO)/pretrain/checkpoint.safetensors \
			--data $(DEMO)/coco-mini --out $(DEMO)/detect --continue && touch $@; fi

$(DEMO)/probe-random-init/results.json: $(DEMO)/pretrain/done
	rm -rf $(DEMO)/probe-random-init
	$(BIN)/ldae probe --ckpt $(DEMO)/pretrain/checkpoint.safetensors --config probe/small-fast.yaml --random-init \
		--out $(DEMO)/probe-random-init

test: env
	$(BIN)/python -m pytest -q

# What CI checks before the tests (and .pre-commit-config.yaml before a commit): lint, import order, format, types
lint: env
	$(BIN)/ruff check ldae_cli tests benchmarks
	$(BIN)/ruff format --check ldae_cli tests benchmarks
	$(BIN)/mypy

bench: env
	$(BIN)/python benchmarks/fit_pca.py

clean-demo:
	rm -rf $(DEMO)
