"""spark-submit entry point for the train-scorers stage: ``spark-submit jobs/train_scorers.py [quadmix train-scorers options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["train-scorers", *sys.argv[1:]])
