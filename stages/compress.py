"""DVC stage `compress`: runs bigmodel_ops/pipeline/compress.py (`bigmodel-ops compress`)."""

import sys

from bigmodel_ops.pipeline import compress
from bigmodel_ops.pipeline._common import run_stage

if __name__ == "__main__":
    sys.exit(run_stage(compress))
