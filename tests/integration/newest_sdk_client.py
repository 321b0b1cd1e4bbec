"""Run by test_sdk_newest.py in a subprocess whose PYTHONPATH holds the newest google-genai:
the calls a user makes, against BASE_URL; prints what each returned as one JSON object.

usage: python newest_sdk_client.py BASE_URL BASE_MODEL TUNED_MODEL
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google import genai
from google.genai import errors, types


def main(base_url: str, base_model: str, tuned_model: str) -> dict[str, Any]:
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=base_url))
    seen: dict[str, Any] = {"version": genai.__version__}
    seen["models"] = [m.name for m in client.models.list()]
    response = client.models.generate_content(
        model=base_model, contents="3", config=types.GenerateContentConfig(max_output_tokens=4)
    )
    seen["text"] = response.text
    seen["total_tokens"] = response.usage_metadata and response.usage_metadata.total_token_count
    seen["count_tokens"] = client.models.count_tokens(model=base_model, contents="3").total_tokens
    try:
        job = client.tunings.tune(
            base_model=base_model,
            training_dataset=types.TuningDataset(
                examples=[types.TuningExample(text_input="1", output="2")]
            ),
            config=types.CreateTuningJobConfig(epoch_count=1, tuned_model_display_name="newest"),
        )
        seen["tune"] = {"name": job.name}
    except errors.ClientError as error:
        seen["tune"] = {
            "error": type(error).__name__,
            "code": error.code,
            "status": error.status,
            "message": error.message,
            "str": str(error),
        }
    job = client.tunings.get(name=tuned_model)
    seen["get"] = {"name": job.name, "state": str(job.state), "base_model": job.base_model}
    return seen


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
