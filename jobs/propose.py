"""spark-submit entry point for the propose stage: ``spark-submit jobs/propose.py [quadmix propose options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["propose", *sys.argv[1:]])
