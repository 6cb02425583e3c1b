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

.PHONY: setup test test-cluster slow bench demo ui wheel clean
setup: $(STAMP) $(JARS_STAMP)

$(STAMP): pyproject.toml requirements/lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70" wheel
	$(PY) -m pip install --quiet -c requirements/lock.txt -e ".[models,dev]"
	touch $@

# Resolves io.delta:delta-spark through Spark's Ivy from Maven Central once; later sessions use the cache.
$(JARS_STAMP): $(STAMP) quadmix_spark/jars.py
	$(PY) -m quadmix_spark.jars
	touch $@

test: setup
	$(PY) -m pytest -m "not slow and not cluster and not gpu" tests

# A real standalone cluster and an MLflow server on 127.0.0.1, spark-submit, and the MLflow UI in Chromium.
test-cluster: setup
	$(PY) -m pytest -m cluster tests/cluster tests/test_ui.py

slow: setup
	$(PY) -m pytest -m "slow" tests

bench: setup
	$(PY) -m bench.run

demo: setup
	$(VENV)/bin/quadmix ingest
	@echo "MLflow UI: make ui   (then open http://127.0.0.1:5000)"

ui: setup
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --workers 1 --backend-store-uri sqlite:///$(abspath .quadmix)/mlflow.db

wheel: setup
	$(PY) -m build --wheel --outdir dist .

clean:
	rm -rf .quadmix dist build *.egg-info bench/results/*.json
