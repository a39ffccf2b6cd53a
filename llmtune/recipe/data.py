"""The `data:` section: where rows come from, their format, and how they become token sequences."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from llmtune.recipe.common import Spec
from llmtune.templates import check_choice

# A data reference with one of these suffixes, or that starts with ./ ../ or /, is a local file and must exist;
# anything else is taken as a dataset name on the Hugging Face Hub.
LOCAL_DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
SEQ2SEQ_FORMATS = ("prompt_completion", "instruction")
DataFormat = Literal[
    "chat", "instruction", "prompt_completion", "text", "preference", "classification", "token_classification"
]
# What a format's rows become: sources of one mixture must all give the same kind (a conversation is a prompt and a
# response, whichever of these formats it was written in).
SAMPLE_KINDS: dict[str, str] = {
    "chat": "conversation",
    "instruction": "conversation",
    "prompt_completion": "conversation",
    "text": "text",
    "preference": "preference",
    "classification": "classification",
    "token_classification": "token_classification",
}


class DataSourceSpec(Spec):
    """One source of a mixture. A bare string is a source with only a path; keys left out come from `data:`."""

    path: str = Field(description="local file, save_to_disk directory or hub name, as a plain data.train")
    format: DataFormat | None = Field(
        None, description="this source's format (default data.format); it must give the same kind of sample"
    )
    columns: dict[str, str] | None = Field(None, description="this source's column map (default data.columns)")
    split: str | None = Field(None, description="split of a hub dataset or DatasetDict directory (default data.split)")
    weight: float | None = Field(
        None,
        gt=0,
        description="sampling weight: rows are drawn from the weighted sources in proportion, by training.seed, "
        "until data.mix_stop; every source of the list has one, or none does",
    )
    count: int | None = Field(
        None, gt=0, description="take exactly this many of its training rows, drawn by training.seed"
    )
    replace: bool = Field(
        False, description="with count: rows may repeat (whole passes, then a draw), so count may exceed the rows"
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_path(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_size(self) -> DataSourceSpec:
        if self.weight is not None and self.count is not None:
            raise ValueError(f"{self.path}: give weight (a share of a mixture) or count (a number of rows), not both")
        if self.replace and self.count is None:
            raise ValueError(f"{self.path}: replace: true repeats rows to reach count: N; set count, or remove replace")
        return self


# A plain string is one source and stays a string in the saved recipe; the tag names the member in error locations
# the way pydantic names union members, so the loader leaves it out of the key path it shows.
DataSources = Annotated[
    Union[
        Annotated[str, Tag("str")],
        Annotated[list[DataSourceSpec], Field(min_length=1), Tag("list[DataSourceSpec]")],
    ],
    Discriminator(lambda value: "str" if isinstance(value, str) else "list[DataSourceSpec]"),
]


class DataSpec(Spec):
    train: DataSources = Field(
        description="local file (.jsonl .json .csv .parquet), save_to_disk directory, or hub name; or a list of "
        "sources (paths, or {path, format, columns, split, weight | count, replace}) mixed into one dataset"
    )
    eval: DataSources | None = Field(
        None, description="held-out data (one source or a list); if absent, eval_split of each train source is held out"
    )
    eval_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of each train source held out when eval is absent"
    )
    mix_stop: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted",
        description="when a weighted mixture ends: when its first source runs out (no row repeats), or when the "
        "last one does (smaller sources repeat)",
    )
    split: str = Field("train", description="split to read from a hub dataset or a DatasetDict directory")
    format: DataFormat = "chat"
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

    def sources(self, key: Literal["train", "eval"]) -> list[tuple[str, str, DataSourceSpec]]:
        """The sources of data.train or data.eval as (key, label, source): the key is `data.train` for a plain
        string and `data.train[1]` in a list; errors and reports name a source by its label (the path of a plain
        string, `data.train[1] (PATH)` in a list); the section's format, columns and split are filled in."""
        value = getattr(self, key)
        if value is None:
            return []
        listed = not isinstance(value, str)
        found = []
        for i, source in enumerate(value if listed else [DataSourceSpec(path=value)]):
            filled = source.model_copy(
                update={
                    "format": source.format or self.format,
                    "columns": self.columns if source.columns is None else source.columns,
                    "split": source.split or self.split,
                }
            )
            name = f"data.{key}[{i}]" if listed else f"data.{key}"
            found.append((name, f"{name} ({source.path})" if listed else source.path, filled))
        return found


def is_local_data_ref(ref: str) -> bool:
    return ref.endswith(LOCAL_DATA_SUFFIXES) or ref.startswith(("./", "../", "/", "~"))
