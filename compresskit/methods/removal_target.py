"""The options of methods that remove sublayers or blocks (FinerCut's greedy order, EvoPress's
depth search): how much to remove, what never to remove, and the precision of the search. One
declaration, so both methods take the same flags with the same meaning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import MethodConfig


class RemovalTargetConfig(MethodConfig):
    remove: float | None = Field(
        None, gt=0, lt=1, json_schema_extra={"flag": "--remove"},
        description="Fraction of the candidates to remove (of the 2L sublayers at --level sublayer), in (0, 1).",
    )
    remove_params: float | None = Field(
        None, gt=0, lt=1, json_schema_extra={"flag": "--remove-params"},
        description="Instead of --remove: remove sublayers in greedy order until the removed share of the decoder "
                    "blocks' parameters is nearest this fraction (stop before or after the crossing removal).",
    )
    keep: str | None = Field(
        None, json_schema_extra={"flag": "--keep"},
        description="Regex on full module names: matching candidates are never removed.",
    )
    score_dtype: Literal["float32", "model"] = Field(
        "float32", json_schema_extra={"flag": "--score-dtype"},
        description="Run the search in float32 (the reference) or in the checkpoint's dtype.",
    )
