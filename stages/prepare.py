"""DVC stage `prepare`: runs bigmodel_ops/pipeline/prepare.py (`bigmodel-ops prepare`)."""

import sys

from bigmodel_ops.pipeline import prepare
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(prepare))
