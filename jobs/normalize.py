"""spark-submit entry point for the normalize stage: ``spark-submit jobs/normalize.py [quadmix normalize options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["normalize", *sys.argv[1:]])
