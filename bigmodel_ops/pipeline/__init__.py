"""The pipeline's stages, one module each, in the order of dvc.yaml.

Each module has ``run(params, *, paths, quiet)``, whose docstring's first line is the stage's
CLI help. Stage modules hold glue only: check inputs, call the library, publish outputs
atomically, log to MLflow. The algorithms live in the libraries below them:

==========  ================================  =========================================
stage       module                            library
==========  ================================  =========================================
prepare     :mod:`bigmodel_ops.pipeline.prepare`   :mod:`bigmodel_ops.data`
tokenize    :mod:`bigmodel_ops.pipeline.tokenize`  :mod:`bigmodel_ops.tokenizer`
pretrain    :mod:`bigmodel_ops.pipeline.pretrain`  :mod:`bigmodel_ops.pretraining`
tune        :mod:`bigmodel_ops.pipeline.tune`      :mod:`bigmodel_ops.tuning`
finetune    :mod:`bigmodel_ops.pipeline.finetune`  :mod:`bigmodel_ops.classification`
evaluate    :mod:`bigmodel_ops.pipeline.evaluate`  :mod:`bigmodel_ops.evaluation`
==========  ================================  =========================================
"""
