"""spark-submit entry point for the proxy stage: ``spark-submit jobs/proxy.py [quadmix proxy options]``."""

import sys

from quadmix_spark.cli import main

if __name__ == "__main__":
    main(["proxy", *sys.argv[1:]])
