# Dreamline: `make demo` runs the sample subject through the real Airflow DAG; `make test` runs the suite;
# `make stack` runs the production shape (PostgreSQL, S3, MLflow server, Airflow) as local processes.
# All create .venv and install what they need on first use. All local state lives under DREAMLINE_HOME, but for
# the stack's, which lives under DREAMLINE_STACK.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The embedded deployment: Airflow, MLflow, the data registry and offline models, all under DREAMLINE_HOME.
export DREAMLINE_HOME ?= $(CURDIR)/.dreamline
export AIRFLOW_HOME ?= $(DREAMLINE_HOME)/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
# The models: DREAMLINE_MODELS=tiny (the default: random weights, built offline under DREAMLINE_HOME/models) or hub
# (the real ones, fetched once and pinned; a CUDA GPU), each overridable by DREAMLINE_BASE_MODEL, _CLIP_MODEL and
# _DINO_MODEL (deploy/local/models.py).
export DVC_NO_ANALYTICS ?= 1

# `make stack`: its one state folder, and extra arguments, e.g. STACK_ARGS="--airflow-port 8081 --schedules off"
export DREAMLINE_STACK ?= $(CURDIR)/.stack
STACK_ARGS ?=

.PHONY: demo test test-reliability test-stack test-browser stack stack-down stack-status ui serve subject pods install clean

demo: $(STAMP)
	$(PY) scripts/demo.py

# TEST_WORKERS processes share the tests out a file at a time (pytest-xdist): a module's fixtures are made once
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest tests -m "not stack and not browser and not reliability" -n $(TEST_WORKERS) --dist loadfile

# Faults, load, hostile input and secrets; docs/reliability.md lists every scenario and the last run's figures.
test-reliability: $(STAMP)
	$(PY) -m pytest tests/reliability -m reliability

# The whole stack from nothing in a temp folder, a DAG run through the REST API, then torn down (-s: its timings).
test-stack: $(STAMP)
	$(PY) -m pytest tests/deployment/test_stack.py -m stack -s

# The trigger form and the run's graph in Debian's chromium against a real Airflow (apt-get install chromium
# chromium-driver). DREAMLINE_SCREENSHOTS=docs/images make test-browser also refreshes docs/operating.md's screenshots.
test-browser: $(STAMP)
	$(PY) -m pytest tests/orchestration/test_browser.py -m browser

stack: $(STAMP)
	$(PY) -m deploy.local.stack up $(STACK_ARGS)

stack-down: $(STAMP)
	$(PY) -m deploy.local.stack down

stack-status: $(STAMP)
	$(PY) -m deploy.local.stack status

ui: $(STAMP)
	$(PY) scripts/ui.py

# The image API over this machine's registry (scripts/serve.py): each subject's champion, or ALIAS=challenger
serve: $(STAMP)  # ALIAS reaches it as make passes command-line variables
	@$(PY) scripts/serve.py

# Your own subject: publish a folder of photos as a dataset version and add its DAG, e.g.
# make subject NAME=rex PHOTOS=~/photos/rex TOKEN=sks CLASS=dog KIND=live (scripts/subject.py)
subject: $(STAMP)  # NAME, PHOTOS, TOKEN, CLASS, KIND, CONSENT, SCHEDULE reach it as make passes command-line variables
	@$(PY) scripts/subject.py

# The manifest of every pod one DAG run would launch in kubernetes mode, e.g. make pods SUBJECT=backpack CONF='{"max_steps": 200}'
SETTINGS ?= deploy/kubernetes/dreamline.env
SUBJECT ?= dog
CONF ?= {}
pods: $(STAMP)
	@PYTHONPATH=plugins $(PY) -m dreamline.pods --settings $(SETTINGS) --subject $(SUBJECT) --conf '$(CONF)'

install: $(STAMP)

# torch first and alone: pip takes the CPU build from local disk (a CUDA build is several GB).
$(STAMP): requirements.txt $(wildcard requirements/*.txt) constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements/no-deps.txt -c constraints.txt
	touch $@

clean:
	rm -rf $(DREAMLINE_HOME)
