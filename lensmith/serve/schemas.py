"""The request and response models of the API and the OpenAPI pieces written by hand (the predict body)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class TopK(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    id: str
    label: str
    confidence: float
    top_k: list[TopK]
    decision: str = Field(
        description="defect | ok | review at the served model's operating point (threshold chosen on validation); "
        "sets without a negative class: the predicted class, or review below the minimum confidence"
    )
    defect_score: float | None = Field(None, description="P(any defect class); null when the model decides by argmax")
    needs_review: bool
    model_version: str
    latency_ms: float
    image_sha256: str
    context: dict[str, str] | None = Field(
        None, description="The images' context as the request sent it (the model's metadata columns: site, line, camera...); null when none"
    )


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_version: str
    latency_ms: float


class FeedbackIn(BaseModel):
    prediction_id: str = Field(..., min_length=1, max_length=64)
    label: str | None = Field(None, min_length=1, max_length=200, description="The correct label")
    wrong: bool = Field(False, description="True when the prediction is wrong but the correct label is unknown")


class FeedbackOut(BaseModel):
    review_item: str
    prediction_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorOut} for s in (400, 401, 403, 404, 409, 413, 415, 422, 503)}

BINARY = {"type": "string", "contentMediaType": "application/octet-stream"}
CONTEXT_FIELDS = (
    "Any other (non-file) field is the images' context, one value for every image of the request: a metadata column of "
    "the served model (GET /v1/model `context_columns`, e.g. site=C), at most serve.max_context_fields fields of at most "
    "serve.max_context_value_chars printable characters; the same may be sent as headers X-Lensmith-Context-<column>. "
    "Another field is refused (422 unknown_context)."
)
PREDICT_BODY = {  # what FastAPI generated for the optional File() parameters `file` and `files`, plus the context fields
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "title": "PredictUpload",
                "description": CONTEXT_FIELDS,
                "additionalProperties": {"type": "string", "minLength": 1, "description": "A context value (e.g. the site)"},
                "properties": {
                    "file": {"anyOf": [BINARY, {"type": "null"}], "title": "File", "description": "One image"},
                    "files": {"anyOf": [{"type": "array", "items": BINARY}, {"type": "null"}], "title": "Files", "description": "Several images"},
                },
            }
        }
    },
}
