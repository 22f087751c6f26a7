"""DVC stage `tune`: runs bigmodel_ops/pipeline/tune.py (`bigmodel-ops tune`)."""

import sys

from bigmodel_ops.pipeline import tune
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(tune))
