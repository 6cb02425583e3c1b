"""spark-submit entry point for the ingest stage: ``spark-submit jobs/ingest.py [quadmix ingest options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["ingest", *sys.argv[1:]])
