"""DVC stage `pretrain`: runs bigmodel_ops/pipeline/pretrain.py (`bigmodel-ops pretrain`)."""

import sys

from bigmodel_ops.pipeline import pretrain
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(pretrain))
