"""The `data:` section: where rows come from, their format, and how they become token sequences."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from llmtune.recipe.common import Spec
from llmtune.templates import check_choice

# A data reference with one of these suffixes, or that starts with ./ ../ or /, is a local file and must exist;
# anything else is taken as a dataset name on the Hugging Face Hub.
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SEQ2SEQ_FORMATS = ("prompt_completion", "instruction")


class DataSpec(Spec):
    train: str = Field(description="local file (.jsonl .json .csv .parquet), save_to_disk directory, or hub name")
    eval: str | None = Field(None, description="held-out data; if absent, eval_split of train is held out")
    eval_split: float = Field(0.1, ge=0.0, lt=1.0, description="fraction of train held out when eval is absent")
    split: str = Field("train", description="split to read from a hub dataset or a DatasetDict directory")
    format: Literal["chat", "instruction", "prompt_completion", "text", "preference", "classification"] = "chat"
    columns: dict[str, str] = Field(
        default_factory=dict, description="map our column names to yours, e.g. {messages: conversations}"
    )
    chat_template: bool | str = Field(
        True,
        description="true: the tokenizer's own template; a registry name (chatml, llama3, llama2, mistral, gemma, "
        "phi3, zephyr, alpaca, vicuna) for a base model that has none; a Jinja string or .jinja file; false: the "
        "turns as plain text, each response ended by EOS (not for format: text)",
    )
    system_prompt: str | None = Field(None, description="system message put before every conversation")
    max_length: int = Field(512, gt=0, description="tokens per row")
    overflow: Literal["truncate", "drop"] = Field("truncate", description="what to do with rows over max_length")
    packing: bool = Field(
        False,
        description="pack rows into max_length sequences with no padding; attention never crosses rows "
        "(position ids restart per row)",
    )

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: bool | str) -> bool | str:
        check_choice(value)
        return value


def is_local_data_ref(ref: str) -> bool:
    return ref.endswith(LOCAL_DATA_SUFFIXES) or ref.startswith(("./", "../", "/", "~"))
