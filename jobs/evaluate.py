"""spark-submit entry point for the evaluate stage: ``spark-submit jobs/evaluate.py [quadmix evaluate options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]])
