"""DVC stage `evaluate`: runs bigmodel_ops/pipeline/evaluate.py (`bigmodel-ops evaluate`)."""

import sys

from bigmodel_ops.pipeline import evaluate
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(evaluate))
