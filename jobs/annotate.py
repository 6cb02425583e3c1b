"""spark-submit entry point for the annotate stage: ``spark-submit jobs/annotate.py [quadmix annotate options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["annotate", *sys.argv[1:]])
