"""DVC stage `tokenize`: runs bigmodel_ops/pipeline/tokenize.py (`bigmodel-ops tokenize`)."""

import sys

from bigmodel_ops.pipeline import tokenize
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(tokenize))
