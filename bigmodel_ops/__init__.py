"""bigmodel_ops: pretrain, tune, fine-tune, evaluate and register transformer LMs."""

__version__ = "0.1.0"
