"""The Delta tables the stages hand to each other, by name, in one place.

Where a name lives is :meth:`quadmix_spark.core.config.StorageConfig.table`: ``<storage.root>/tables/<name>``, or
``<catalog>.<schema>.<name>`` with a catalog. Reading and writing them is :mod:`quadmix_spark.core.storage`.

=====================  ==================  ======================================================================
table                  written by          one row per
=====================  ==================  ======================================================================
``documents``          ingest              accepted document (doc_id, text, source, n_tokens, ...)
``rejects``            ingest              input row not accepted, with the reason and where it came from
``ingest_log``         ingest              input unit ingested (a file's path, size and time, or a Delta version)
``annotations``        annotate            document: domain, one score column per criterion, scorer versions
``score_knots``        normalize           criterion: the σ knots (percentile or z-score)
``selection``          sample              (run, document): one θ's r̄, S and copies for every document
``training_output``    sample              (run, document copy) of the training set
``proxy_index``        sample (many θ)     (θ, document) with copies > 0, with S: what a proxy trains on
``proxy_theta_tokens`` sample (many θ)     θ: its realized and unique tokens
=====================  ==================  ======================================================================
"""

from __future__ import annotations

DOCUMENTS = "documents"
REJECTS = "rejects"
INGEST_LOG = "ingest_log"
ANNOTATIONS = "annotations"
SCORE_KNOTS = "score_knots"
SELECTION = "selection"
TRAINING_OUTPUT = "training_output"
PROXY_INDEX = "proxy_index"
PROXY_THETA_TOKENS = "proxy_theta_tokens"

SCORE_PREFIX = "q_"  # annotations: the score of criterion c is column q_<c>
