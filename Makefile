# Dreamline: `make demo` runs the sample subject through the real Airflow DAG; `make test` runs the suite.
# Both create .venv and install what they need on first use. All local state lives under DREAMLINE_HOME.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The embedded deployment: Airflow, MLflow, the data registry and offline models, all under DREAMLINE_HOME.
export DREAMLINE_HOME ?= $(CURDIR)/.dreamline
export AIRFLOW_HOME ?= $(DREAMLINE_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export DREAMLINE_BASE_MODEL ?= $(DREAMLINE_HOME)/models/tiny-sdxl
export DREAMLINE_CLIP_MODEL ?= $(DREAMLINE_HOME)/models/evaluators/clip
export DREAMLINE_DINO_MODEL ?= $(DREAMLINE_HOME)/models/evaluators/dino
export HF_HUB_OFFLINE ?= 1
export DVC_NO_ANALYTICS ?= 1

.PHONY: demo test ui pods install clean

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	$(PY) -m pytest tests

ui: $(STAMP)
	$(PY) scripts/ui.py

# The manifest of every pod one DAG run would launch in kubernetes mode, e.g. make pods CONF='{"max_steps": 200}'
SETTINGS ?= deploy/kubernetes/dreamline.env
CONF ?= {}
pods: $(STAMP)
	@PYTHONPATH=plugins $(PY) -m dreamline.pods --settings $(SETTINGS) --conf '$(CONF)'

install: $(STAMP)

# torch first and alone: pip takes the CPU build from local disk (a CUDA build is several GB).
$(STAMP): requirements.txt $(wildcard requirements/*.txt) constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	touch $@

clean:
	rm -rf $(DREAMLINE_HOME)
