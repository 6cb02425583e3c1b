"""spark-submit entry point for the sample stage: ``spark-submit jobs/sample.py [quadmix sample options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["sample", *sys.argv[1:]])
