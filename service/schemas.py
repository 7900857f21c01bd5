"""Wire models of the HTTP API: ScoreRequest in, ScoreResponse out, and their parsing.

Raw ids travel as strings (docs/bundle.md): a JSON number is accepted for item ids, categories,
context values and the user id and normalised to its decimal text, so `7` and `"7"` are the same
item. Booleans and floats are refused rather than guessed at. Static shape limits live here;
limits that depend on Settings (candidate count, user-id length) are checked in parse_score_request
so the 4xx can name the configured limit.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from service.errors import InvalidRequest, invalid_from_validation

MAX_ID_LENGTH = 256  # characters in an item id, category or context value
MAX_CATEGORIES_PER_CANDIDATE = 64  # the model keeps its own first C of them
MAX_CONTEXT_FEATURES = 64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _as_text(value: int | str) -> str:
    return str(value) if isinstance(value, int) else value


_ID_MESSAGE = f"must be an integer or a non-empty string of at most {MAX_ID_LENGTH} characters"
_ID_JSON: JsonSchemaValue = {
    "anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH}]
}


def _id_union() -> core_schema.CoreSchema:
    return core_schema.union_schema(
        [
            core_schema.int_schema(strict=True),
            core_schema.str_schema(strict=True, min_length=1, max_length=MAX_ID_LENGTH),
        ],
        custom_error_type="raw_id",
        custom_error_message=_ID_MESSAGE,
    )


def _as_category_list(value: int | str | list[int | str]) -> list[str]:
    if isinstance(value, list):
        return [_as_text(v) for v in value]
    return [_as_text(value)]


class _RawIdMarker:
    """Annotated marker: a JSON integer or string, handed on as its decimal text.

    One union with one error message: pydantic's default union reports each member's failure
    under loc suffixes like `user_id.int`, which names no field the client wrote.
    """

    @staticmethod
    def __get_pydantic_core_schema__(
        source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(_as_text, _id_union())

    @staticmethod
    def __get_pydantic_json_schema__(
        schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return dict(_ID_JSON)


class _CategoriesMarker:
    """Annotated marker: one raw id or a list of them, handed on as a list of texts."""

    @staticmethod
    def __get_pydantic_core_schema__(
        source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        either = core_schema.union_schema(
            [
                _id_union(),
                core_schema.list_schema(
                    _id_union(), min_length=1, max_length=MAX_CATEGORIES_PER_CANDIDATE, strict=True
                ),
            ],
            custom_error_type="categories",
            custom_error_message=(
                f"must be a category id or a list of 1 to {MAX_CATEGORIES_PER_CANDIDATE} of "
                f"them; each {_ID_MESSAGE}"
            ),
        )
        return core_schema.no_info_after_validator_function(_as_category_list, either)

    @staticmethod
    def __get_pydantic_json_schema__(
        schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "anyOf": [
                dict(_ID_JSON),
                {
                    "type": "array",
                    "items": dict(_ID_JSON),
                    "minItems": 1,
                    "maxItems": MAX_CATEGORIES_PER_CANDIDATE,
                },
            ]
        }


RawId = Annotated[str, _RawIdMarker]
RawCategories = Annotated[list[str], _CategoriesMarker]


class Candidate(BaseModel):
    """One item to score; `category` overrides the bundle's item table for this request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item_id: RawId
    category: RawCategories | None = None


class ScoreRequest(BaseModel):
    """POST /score body: one user, N candidates, optional request-context features."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: RawId
    candidates: Annotated[list[Candidate], Field(min_length=1)]
    context: Annotated[dict[str, RawId], Field(max_length=MAX_CONTEXT_FEATURES)] | None = None


class ScoreResponse(BaseModel):
    """POST /score answer; scores[i] belongs to candidates[i]."""

    model_version: str
    scores: list[float]
    history_length: int = Field(description="history entries the model saw (0 when degraded)")
    degraded: bool = Field(description="true when Redis was unavailable and the history empty")


def parse_score_request(body: bytes, max_candidates: int, max_user_id_length: int) -> ScoreRequest:
    """Validate a raw JSON body; raises InvalidRequest naming the field and the limit."""
    try:
        request = ScoreRequest.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_from_validation(exc.errors(include_input=False)) from None
    n = len(request.candidates)
    if n > max_candidates:
        raise InvalidRequest(
            f"candidates: at most {max_candidates} allowed (got {n})",
            field="candidates",
            limit=max_candidates,
        )
    if len(request.user_id) > max_user_id_length:
        raise InvalidRequest(
            f"user_id: at most {max_user_id_length} characters allowed "
            f"(got {len(request.user_id)})",
            field="user_id",
            limit=max_user_id_length,
        )
    if _CONTROL.search(request.user_id):
        # The id becomes part of a Redis key and of log lines; control characters in it are
        # always a client bug.
        raise InvalidRequest("user_id: control characters are not allowed", field="user_id")
    return request
