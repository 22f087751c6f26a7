"""MLflow dataset entries for the prepared files: metadata only, no data is loaded.

`mlflow.data.from_pandas` would hash (and so load) the data; a MetaDataset only
records the source path, our own content digest, the schema and a profile with
row and label counts, which the report already has.
"""

from __future__ import annotations

import json
from typing import Any

from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource  # registered at import of mlflow.data
from mlflow.entities import DatasetInput, InputTag
from mlflow.types import ColSpec, DataType, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

LABELED = Schema(
    [
        ColSpec(DataType.string, "text"),
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.integer, "label_id"),
    ]
)
UNLABELED = Schema([ColSpec(DataType.string, "text")])


class PreparedDataset(MetaDataset):
    """A MetaDataset that also carries a profile (row and label counts)."""

    def __init__(self, *, profile: dict[str, Any], **kwargs: Any) -> None:
        self._profile = profile
        super().__init__(**kwargs)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        config["profile"] = json.dumps(self._profile)
        return config


def schema_dict(*, labeled: bool) -> dict[str, Any]:
    """The schema in MLflow's JSON form (what the UI shows under the dataset)."""
    return {"mlflow_colspec": (LABELED if labeled else UNLABELED).to_dict()}


def dataset_input(
    *,
    name: str,
    source: str,
    digest: str,
    context: str,
    profile: dict[str, Any],
    schema: dict[str, Any] | None = None,
) -> DatasetInput:
    """A DatasetInput for `client.log_inputs` (digest: at most 36 chars, the store's limit)."""
    dataset = PreparedDataset(
        source=LocalArtifactDatasetSource(source),
        name=name,
        digest=digest[:36],
        schema=Schema.from_json(json.dumps(schema["mlflow_colspec"])) if schema else None,
        profile=profile,
    )
    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)
