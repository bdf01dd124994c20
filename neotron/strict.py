"""The base of every config model: strict (unknown keys are errors), frozen, and with a
close-match suggestion for a misspelt key."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StrictModel(BaseModel):
    """A config section. Unknown keys are rejected with the nearest allowed key named."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own extra="forbid" error does not say which keys *are* allowed; this one
        # does, and runs first so the user sees the helpful message.
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            for key in data:
                if key not in allowed:
                    close = difflib.get_close_matches(str(key), sorted(allowed), n=1, cutoff=0.6)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    # "@key: ..." lets the error formatter put the key into the path
                    raise ValueError(
                        f"@{key}: unknown key{hint} (allowed: {', '.join(sorted(allowed))})"
                    )
        return data
