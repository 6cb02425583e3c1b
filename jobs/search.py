"""spark-submit entry point for the search stage: ``spark-submit jobs/search.py [quadmix search options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["search", *sys.argv[1:]])
