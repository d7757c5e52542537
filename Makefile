# make setup | make test | make models | make run   (see README.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DING := /usr/share/trans/de-en
PROMETHEUS := /usr/bin/prometheus
RUN_DIR := runs/de-en-bahdanau
CAPTION_RUN := runs/scenes-sat
# The gpu extra (CUDA and cuDNN from pip, for onnxruntime-gpu) only where the NVIDIA driver lists a GPU.
EXTRAS := train,dev$(shell nvidia-smi -L 2>/dev/null | grep -q '^GPU' && echo ,gpu)
LOWEST := .venv-lowest

.PHONY: setup test test-lowest lint models variants benchmark run clean

setup: $(STAMP) $(DING) $(PROMETHEUS)

# torch goes first and alone, pinned, so that nothing later resolves a newer (CUDA) build.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

$(DING):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq trans-de-en

# prometheus and promtool, for tests/integration/test_prometheus.py (a real Prometheus scraping a test server).
$(PROMETHEUS):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq --no-install-recommends prometheus

test: setup
	$(PY) -m pytest -q

# The server's tests with every direct dependency of the project and of its train and dev extras at the lowest version
# pyproject.toml allows (`>=X` installed as `==X`), in a virtual environment of their own: the floors are claims that
# this checks. torch goes first and alone, with pip (which takes the CPU wheel from this machine), as in set-up.
define FLOORS
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for requirement in project["dependencies"] + extras["train"] + extras["dev"]:
    if ">=" in requirement:
        print(re.sub(r"\[.*?\]", "", requirement).replace(">=", "==", 1))
endef
export FLOORS
# The integration tests (servers, the V2 protocol, export and training paths) and the unit tests of the server, the
# client and the packaging: about 2 minutes on 2 cores, the training and model unit tests left to `make test`.
LOWEST_TESTS := tests/integration tests/unit/test_server_*.py tests/unit/test_dockerfile.py tests/unit/test_tokenizer.py \
	tests/unit/test_engine.py tests/unit/test_search.py tests/unit/test_io_binding.py tests/unit/test_security.py \
	tests/unit/test_triton_tensors.py tests/unit/test_caption_imaging.py tests/unit/test_deploy.py \
	tests/unit/test_quantize.py tests/unit/test_batch_io.py tests/unit/test_client_render.py tests/unit/test_remote_models.py tests/unit/test_ipc_framing.py tests/unit/test_engine_endpoint.py \
	tests/unit/test_processes.py

$(LOWEST)/.installed: pyproject.toml constraints.txt
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install -q --upgrade pip
	$(LOWEST)/bin/python -m pip install -q -c constraints.txt torch==2.13.0
	$(PYTHON) -c "$$FLOORS" > $(LOWEST)/floors.txt
	$(LOWEST)/bin/python -m pip install -q -c constraints.txt -c $(LOWEST)/floors.txt -e '.[train,dev]'
	touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pytest -q $(LOWEST_TESTS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Rebuilds the bundled models from scratch (the Ding translator, the captioner, then the mixed-corpus translator:
# about 4 hours on a 2-core CPU).
models: setup
	rm -rf $(RUN_DIR)
	$(VENV)/bin/attn-train translation --data ding --out $(RUN_DIR) --max-minutes 75 --threads 1 --valid-every 1500
	$(VENV)/bin/attn-train evaluate $(RUN_DIR)/best.pt --split test --out $(RUN_DIR)/eval-test.json
	$(VENV)/bin/attn-export $(RUN_DIR)/best.pt --out models/de-en-bahdanau/1 --int8 --parity-sentences 500 \
		--metrics $(RUN_DIR)/eval-test.json --force
	@# The captioner: Show, Attend and Tell on generated scenes (about 30 minutes); overlays go to docs/.
	rm -rf $(CAPTION_RUN)
	$(VENV)/bin/attn-train caption --out $(CAPTION_RUN) --train-images 20000 --stages 2 --extra-blocks 3 \
		--no-lstm-reads-context --alpha-reg 0.005 --best-by valid_attention_correctness --max-minutes 30 \
		--valid-every 250 --threads 1
	$(VENV)/bin/attn-train evaluate $(CAPTION_RUN)/best.pt --split test --out $(CAPTION_RUN)/eval-test.json
	$(VENV)/bin/attn-export $(CAPTION_RUN)/best.pt --out models/scenes-sat/1 --parity-sentences 500 \
		--metrics $(CAPTION_RUN)/eval-test.json --overlays docs --force
	@# The mixed-corpus translator (models/de-en-mixed/2, docs/translation-quality.md) on Ding + DDTP + gettext (make
	@# data): Luong's global attention with the general score. Budget: 26,000 steps of batches of 1,500 tokens on ONE
	@# CPU core, about 2 h 40 min at ~2.8 steps/s (~3,500 target tokens/s; steps, not minutes, so that a loaded machine
	@# trains as far), plus 3 minutes per run to load the corpus (and once to train the tokenizer). 20,000 steps at a
	@# constant learning rate (24.3M target tokens, 3.2 epochs), then 6,000 resumed from that run's last.pt with the
	@# learning rate decaying linearly to zero and the Ding phrases twice and the gettext messages with placeholders
	@# three times per epoch; then the per-domain evaluation on the whole held-out sets (about 10 minutes) and the export.
	$(MAKE) data
	rm -rf runs/de-en-mixed
	$(VENV)/bin/attn-train translation --data mixed --out runs/de-en-mixed --attention luong-general --max-steps 20000 \
		--threads 1 --max-tokens 1500 --dropout 0.0 --valid-every 2000
	$(VENV)/bin/attn-train translation --resume runs/de-en-mixed/last.pt --max-steps 26000 --cooldown-steps 6000 \
		--repeat ding-phrases=2,placeholders=3
	$(PY) -m training.evaluate runs/de-en-mixed/best.pt --split test --sample 0 --threads 1 \
		--out runs/de-en-mixed/eval-domains.json
	$(PY) -m training.evaluate runs/de-en-mixed/best.pt --table training/data/quality_table.tsv \
		--out runs/de-en-mixed/quality-table.json
	$(VENV)/bin/attn-export runs/de-en-mixed/best.pt --out models/de-en-mixed/2 --int8 --parity-sentences 200 \
		--metrics runs/de-en-mixed/eval-domains.json --force

# The attention-variants experiment: eight variants (no attention, Bahdanau's, Luong's three global scores, local-m,
# local-p, a Transformer) trained on the mixed corpus (make data) with the same budget of 3M target tokens, measured,
# docs/attention-variants.md (about 25 minutes per variant on one core; interrupted runs
# continue where they stopped, and a variant's results are reused, so several runs with different --variants can
# share the cores).
variants: setup
	$(PY) bench/attention_variants.py --data mixed \
		--variants none,bahdanau,luong-dot,luong-general,luong-concat,local-m,local-p,transformer \
		--reference models/de-en-mixed/2 --budget-tokens 3000000 --eval-sample 1000 --max-tokens 1500 --dropout 0.0 \
		--warmup-steps 0 --window 10 --threads 1 --ort-threads 1 --work runs/variants-mixed --out docs

# The serving benchmarks (about 30 minutes): docs/benchmarks.md. bench/serving.py: the bundled model against PyTorch
# eager and batching off ((a) needs the checkpoint that `make models` leaves in runs/de-en-bahdanau/);
# bench/overhead.py: the server's own cost per sentence, one process against front-ends and an engine process;
# bench/grpc_floor.py: the same load against a gRPC server that does nothing, the floor under that cost;
# bench/engine_ceiling.py: one engine process driven on its socket, without gRPC or front-ends;
# bench/soak.py: 40,000 requests with every bundled model loaded, the memory of each server process (5 minutes).
# bench/connection_age.py: the answers a client reading slowly loses when the connection age moves it (2 minutes).
# Each writes its results under docs/benchmarks/, and all but grpc_floor.py, engine_ceiling.py and connection_age.py
# their own section of docs/benchmarks.md.
benchmark: setup
	$(PY) bench/serving.py
	$(PY) bench/overhead.py
	$(PY) bench/one_client.py
	$(PY) bench/first_call.py
	$(PY) bench/grpc_floor.py
	$(PY) bench/engine_ceiling.py
	$(PY) bench/soak.py
	$(PY) bench/connection_age.py
	$(PY) bench/hostile.py

# Serves the bundled models (models/, or ATTN_MODELS_DIR) on localhost:50051, metrics on :9464; Ctrl-C drains.
# The commands it suggests name the server with --target when ATTN_PORT moves it off attn's default, 50051, and
# say which client flags TLS and tokens need.
# The mixed-corpus translator (docs/translation-quality.md) answers requests that name no model, when it is there.
run: setup
	@models="$${ATTN_MODELS_DIR:-models}"; \
	if ! ls "$$models"/*/*/manifest.json >/dev/null 2>&1; then \
		echo "No exported model under $$models/ (<name>/<version>/manifest.json): run 'make models' first," \
			"or point ATTN_MODELS_DIR at a models directory."; exit 1; fi; \
	port="$${ATTN_PORT:-50051}"; \
	echo "Serving $$models on localhost:$$port (metrics: http://localhost:$${ATTN_METRICS_PORT:-9464}/metrics)."; \
	target=""; if [ "$$port" != 50051 ]; then target=" --target localhost:$$port"; fi; \
	echo "Once it logs 'ready', in another shell:"; \
	echo "  $(VENV)/bin/attn translate \"Ich hoffe, es geht dir gut.\"$$target"; \
	echo "  $(VENV)/bin/attn caption docs/scenes-sat-example-1-input.png --overlay /tmp/overlay.png$$target"; \
	echo "  $(VENV)/bin/attn models$$target"; \
	if [ -n "$${ATTN_TLS_CERT:-}" ]; then echo "  (TLS is on: add --tls-ca with the CA of its certificate$${ATTN_TLS_CLIENT_CA:+, and --tls-cert and --tls-key for mutual TLS})"; fi; \
	if [ -n "$${ATTN_AUTH_TOKEN_FILE:-}" ]; then echo "  (tokens are required: add --token-file with one of them, or set ATTN_TOKEN)"; fi; \
	default="$${ATTN_DEFAULT_MODEL:-}"; \
	if [ -z "$$default" ] && [ -d "$$models/de-en-mixed" ]; then default=de-en-mixed; fi; \
	ATTN_MODELS_DIR="$$models" ATTN_DEFAULT_MODEL="$$default" ATTN_LOG_FORMAT="$${ATTN_LOG_FORMAT:-text}" \
		exec $(VENV)/bin/attn-serve

clean:
	rm -rf $(VENV) $(LOWEST) runs build *.egg-info

# The German→English corpus, data/de-en/ (train/valid/test.tsv + manifest.json): the Ding dictionary, Debian package
# descriptions (DDTP) and gettext catalogs, all from the Debian archive (about 800 MB of downloads, cached in
# data/cache/; docs/data.md). Train on it with --data mixed.
.PHONY: data
data: setup
	$(PY) -m training.data.build --out data/de-en --cache data/cache
