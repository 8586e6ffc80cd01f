"""The ``/v1/embeddings`` fields a dataset run sends with every row (``embedpipe embed
--input-type/--long-text``), in process or on a server."""

from __future__ import annotations

from dataclasses import dataclass

from embedpipe.embedders.prompts import InputType
from embedpipe.embedders.tokens import LongText


@dataclass(frozen=True, slots=True)
class RequestOptions:
    input_type: InputType | None = None
    long_text: LongText = "truncate"

    @property
    def fields(self) -> dict[str, str]:
        """The fields that are not their default: the body's extra fields, and part of a
        job's identity only then, so that runs from before they existed still resume."""
        fields: dict[str, str] = {}
        if self.input_type is not None:
            fields["input_type"] = self.input_type
        if self.long_text != "truncate":
            fields["long_text"] = self.long_text
        return fields
