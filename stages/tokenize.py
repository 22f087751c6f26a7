"""DVC stage 'tokenize': validate params.yaml, run the stage, exit non-zero on failure."""

import sys

from bigmodel_ops.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenize", *sys.argv[1:]]))
