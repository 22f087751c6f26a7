"""Thin DVC stage entry points, one per stage, each calling one package function.

dvc.yaml runs them as modules (`python -m stages.tokenize`): run as a plain script,
`stages/tokenize.py` would put this folder first on sys.path and shadow the
standard library's `tokenize` module.
"""
