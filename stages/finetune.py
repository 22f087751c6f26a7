"""DVC stage `finetune`: runs bigmodel_ops/pipeline/finetune.py (`bigmodel-ops finetune`)."""

import sys

from bigmodel_ops.pipeline import finetune
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(finetune))
