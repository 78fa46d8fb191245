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
PREDICT_BODY = {  # what FastAPI generated for the optional File() parameters `file` and `files`
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "title": "PredictUpload",
                "properties": {
                    "file": {"anyOf": [BINARY, {"type": "null"}], "title": "File", "description": "One image"},
                    "files": {"anyOf": [{"type": "array", "items": BINARY}, {"type": "null"}], "title": "Files", "description": "Several images"},
                },
            }
        }
    },
}
