"""DVC stage entry points, one per stage, each naming the one module it runs.

dvc.yaml runs them as modules (``python -m stages.tokenize``), and each imports only its stage's
module under ``bigmodel_ops/pipeline/`` and the shared command wrapper (``pipeline._common.run_stage``: params
validation, ``--params`` / ``--quiet``, exit codes). Run as a plain script, ``stages/tokenize.py``
would put this folder first on sys.path and shadow the standard library's ``tokenize`` module.
"""
