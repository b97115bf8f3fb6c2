# m3search — two commands do everything:  `make demo`  and  `make test`.
# Each creates its own virtual environment on first use (CPU build of torch first).

PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
# CPU build of torch (this pin resolves to the CPU wheel on PyPI mirrors that carry it).
# GPU users: `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" ...`
TORCH_SPEC ?= torch==2.13.0
# Model: BAAI/bge-m3 (downloaded on first use) unless M3SEARCH_MODEL or MODEL names another id or a local folder.
MODEL      ?= $(or $(M3SEARCH_MODEL),BAAI/bge-m3)
# A real corpus shipped with the repository: 300 Cranfield abstracts in BEIR format (source, licence: data/README.md).
DATA       ?= data/cranfield-demo
# One collection per corpus: another DATA is never added to the demo's collection.
COLLECTION ?= runs/demo-$(notdir $(abspath $(DATA)))
QUERY      ?= what similarity laws must be obeyed when constructing aeroelastic models of heated high speed aircraft
FLAG_VENV  ?= .venv-flag

.PHONY: install demo test test-heavy lint flag-venv clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $@

# FlagEmbedding 1.4.2 (the reference implementation) needs transformers<5: it lives in its own venv,
# used only by the parity tests through a subprocess.
flag-venv: $(FLAG_VENV)/.installed

$(FLAG_VENV)/.installed:
	$(PYTHON) -m venv $(FLAG_VENV)
	$(FLAG_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLAG_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(FLAG_VENV)/bin/python -m pip install -q "FlagEmbedding==1.4.2" "transformers>=4.44,<5"
	touch $@

# Main job: index a real corpus, search it (then again with --explain: per-mode scores, matched tokens), show what is stored.
demo: install
	$(BIN)/m3search index $(DATA)/corpus.jsonl --collection $(COLLECTION) --model "$(MODEL)"
	$(BIN)/m3search search "$(QUERY)" --collection $(COLLECTION) --k 5
	$(BIN)/m3search search "$(QUERY)" --collection $(COLLECTION) --k 3 --explain
	$(BIN)/m3search info --collection $(COLLECTION)

# Lint + format check (ruff, configured in pyproject.toml), then the default suite.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install flag-venv lint
	$(BIN)/python -m pytest -q

# Slow checks (real-model evaluation, kill -9 loops, fuzzing): CI's second step.
test-heavy: install flag-venv
	$(BIN)/python -m pytest -q -m heavy; rc=$$?; [ $$rc -eq 5 ] && echo "no heavy tests selected" && rc=0; exit $$rc

clean:
	rm -rf $(VENV) $(FLAG_VENV) runs .pytest_cache
