# make demo   set up, get Fashion-MNIST, train AlexNet on it, compress two layers, print the report
# make test   set up and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DATA := data
DEMO_RUN := runs/alexnet_fashion/demo
DEMO_CKPT := $(DEMO_RUN)/checkpoints/best.ckpt

.PHONY: help install data demo test test-fast bench clean
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(VENV)/.installed  ## create .venv and install the project with its test extra
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,export]"
	touch $@

data: install  ## Fashion-MNIST into data/ (Debian's dataset-fashion-mnist if apt works, else torchvision's download)
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -f $(DATA)/FashionMNIST/raw/train-images-idx3-ubyte ]; then \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null) || true; \
	  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then \
	    sudo apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || true; \
	  fi; \
	fi
	$(PY) -m datamodules.fashion_mnist --root $(DATA) --download

$(DEMO_CKPT):
	$(PY) train.py --config alexnet_fashion --trainer.logger.init_args.version demo

demo: install data $(DEMO_CKPT)  ## train (once) and compress AlexNet on Fashion-MNIST, export it to ONNX, print the report
	$(PY) compress.py --config alexnet_fashion_compress --checkpoint $(DEMO_CKPT) --export onnx

test: install data  ## the whole test suite (CPU)
	$(PY) -m pytest -q

test-fast: install data  ## the suite without the slow real-data runs
	$(PY) -m pytest -q -m "not slow"

bench: install  ## the benchmark scripts' dependencies (scikit-learn, skglm, torch-pruning)
	$(PY) -m pip install --quiet -e ".[test,bench]"

clean:  ## remove runs and caches (keeps .venv and data)
	rm -rf runs outputs .cache lightning_logs .pytest_cache
