"""User-facing errors.

Every error a user can fix (bad params, bad input data, incompatible checkpoint)
is a :class:`BigModelOpsError`. The CLI prints its message without a traceback
and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

# Shared by the params schema (an explicit cpu) and the Trainer builder ("auto" on a CPU machine).
FSDP_NEEDS_GPU = (
    "strategy 'fsdp' needs CUDA GPUs (Lightning's FSDP strategy does not run on CPU); "
    "use strategy 'ddp' on CPU, which runs one gloo process per device"
)


class BigModelOpsError(Exception):
    """An error caused by the user's input, with a message that says what to fix."""

    exit_code = 2


class ConfigError(BigModelOpsError):
    """params.yaml (or an override) is invalid."""


class DataError(BigModelOpsError):
    """Input data is missing, unreadable or inconsistent with params."""


class CheckpointError(BigModelOpsError):
    """A checkpoint or exported model does not match the configuration."""


class TrainingDiverged(BigModelOpsError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
