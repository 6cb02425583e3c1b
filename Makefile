# quadmix-spark: `make demo` runs the pipeline on the embedded default, `make test` runs the tests.
# Both install what they need first (virtual environment, pinned packages, Delta jars).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export QUADMIX_SHARED ?= $(abspath ../shared)
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

STAMP := $(VENV)/.installed
JARS_STAMP := $(VENV)/.delta-jars

.PHONY: setup test test-cluster test-faults test-faults-ci slow bench quality demo ui wheel clean
setup: $(STAMP) $(JARS_STAMP)

$(STAMP): pyproject.toml setup.py udfs/_bpe_native.c udfs/_text_stats_native.c requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install --quiet -c requirements/lock.txt -e ".[models,proxy,dev]"
	touch $@

# Resolves io.delta:delta-spark through Spark's Ivy from Maven Central once; later sessions use the cache.
$(JARS_STAMP): $(STAMP) quadmix_spark/core/jars.py
	$(PY) -m quadmix_spark.core.jars
	touch $@

test: setup
	$(PY) -m pytest -m "not slow and not cluster and not faults" tests

# A real standalone cluster and an MLflow server on 127.0.0.1, spark-submit, and the MLflow UI in Chromium.
test-cluster: setup
	$(PY) -m pytest -m cluster tests/cluster tests/test_ui.py

# Stage drivers SIGKILLed at fault points and rerun, and stages run twice at once (about 40 minutes on 2 cores).
test-faults: setup
	$(PY) -m pytest -m faults tests/faults

# The part of test-faults that CI runs: one kill point per stage that writes, and three of the races.
test-faults-ci: setup
	$(PY) -m pytest -m "faults and ci" tests/faults

slow: setup
	$(PY) -m pytest -m "slow" tests

bench: setup
	$(PY) -m bench.run

# The selection-quality experiment (hours on 2 cores; resumable: run it again to continue).
quality: setup
	$(PY) -m bench.quality $(QUALITY_ARGS)

DEMO_CONF := -c conf/default.yaml -c conf/scorers.yaml -c conf/search-demo.yaml

demo: setup
	$(VENV)/bin/quadmix ingest $(DEMO_CONF)
	$(VENV)/bin/quadmix train-scorers $(DEMO_CONF)
	$(VENV)/bin/quadmix annotate $(DEMO_CONF)
	$(VENV)/bin/quadmix normalize $(DEMO_CONF)
	$(VENV)/bin/quadmix sample $(DEMO_CONF) --params conf/theta-demo.yaml --set sampling.run=demo-theta --set sampling.budget_tokens=2000000
	$(VENV)/bin/quadmix propose $(DEMO_CONF)
	$(VENV)/bin/quadmix proxy $(DEMO_CONF)
	$(VENV)/bin/quadmix search $(DEMO_CONF)
	$(VENV)/bin/quadmix sample $(DEMO_CONF) --params search:demo --set sampling.run=demo-star --set sampling.budget_tokens=2000000
	$(VENV)/bin/quadmix evaluate $(DEMO_CONF)
	$(VENV)/bin/quadmix evaluate $(DEMO_CONF) --set proxy.model.kind=transformer
	$(PY) -m quadmix_spark.summary $(DEMO_CONF)

ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///$(abspath $(or $(QUADMIX_ROOT),.quadmix))/mlflow.db

wheel: setup
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf .quadmix dist build *.egg-info bench/results/*.json
