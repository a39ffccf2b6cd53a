"""Publish a run, or a merged model, as a Hugging Face Hub model repository.

The repository holds what loads from it directly: an adapter run puts adapter_config.json and the adapter weights at
the top level beside the tokenizer (so peft's `PeftModel.from_pretrained(base, REPO)` and
`AutoTokenizer.from_pretrained(REPO)` work), a full fine-tune or a merged model its weights (so
`AutoModelForCausalLM.from_pretrained(REPO)` does); the model card, the resolved recipe and the metrics go with
them. Checkpoints, optimizer states, logs and predictions stay local: they are for resuming and debugging, and
predictions would publish held-out data.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, HTTPError

from llmtune import artifacts
from llmtune.artifacts import RunDir, is_run_dir, open_run
from llmtune.errors import LLMTuneError, first_line
from llmtune.models import hub_reachable
from llmtune.recipe.training import check_repo_id
from llmtune.report import MODEL_CARD_FILE

# Files of a run directory, besides weights and tokenizer, that say how the model was made and how well it does.
RUN_RECORDS = (MODEL_CARD_FILE, artifacts.RECIPE_FILE, artifacts.METRICS_FILE, artifacts.EVAL_FILE)
# peft writes its own template card into the adapter directory; the run's model card takes README.md.
_PEFT_CARD = "README.md"
LOGIN_HINT = "log in with `hf auth login`, or set HF_TOKEN to a token with write access"


@dataclass
class PushResult:
    repo_id: str
    url: str | None  # the commit on the Hub; None for a dry run
    files: list[tuple[str, int]]  # (path in the repository, bytes), in upload order
    private: bool


def files_to_push(target: Path) -> list[tuple[Path, str]]:
    """(local file, path in the repository) for everything `target` uploads as it stands: a completed run directory
    or a model directory (what merge-adapter writes)."""
    target = Path(target)
    if is_run_dir(target):
        run = open_run(target)
        if run.is_checkpoint:
            raise LLMTuneError(
                f"{target}: a training checkpoint holds optimizer states for resuming, not a model to publish; push "
                "the completed run directory"
            )
        weights = run.adapter if run.recipe().method.saves_adapter else run.model
        pairs = [(p, p.name) for p in _files(weights) if not (weights == run.adapter and p.name == _PEFT_CARD)]
        pairs += [(p, p.name) for p in _files(run.tokenizer)]
        pairs += [(run.file(name), name) for name in RUN_RECORDS if run.file(name).is_file()]
    elif (target / "config.json").is_file():
        pairs = [(p, p.relative_to(target).as_posix()) for p in _files(target, recursive=True)]
    else:
        raise LLMTuneError(
            f"{target}: neither a run directory (no {artifacts.RECIPE_FILE}) nor a model directory (no config.json); "
            "give a run directory or a directory written by merge-adapter"
        )
    seen: dict[str, Path] = {}
    for local, name in pairs:
        if name in seen:  # two sources for one repository path would silently publish only the last
            raise LLMTuneError(f"{target}: {seen[name]} and {local} would both be uploaded as {name}")
        seen[name] = local
    return pairs


def push(
    target: Path,
    repo_id: str,
    private: bool = False,
    merged: bool = False,
    token: str | None = None,
    dry_run: bool = False,
) -> PushResult:
    """Upload `target` (a run directory or a model directory) to the Hub model repository `repo_id`, creating it
    when missing.

    Args:
        merged: for an adapter run, merge the adapter into its base first (checked as merge-adapter checks it) and
            upload the standalone model; a run that trained the weights themselves uploads them either way.
        dry_run: list what would be uploaded without a token or the network (a merge still runs, locally).
    """
    target = Path(target).expanduser().resolve()
    try:
        check_repo_id(repo_id)
    except ValueError as e:
        raise LLMTuneError(f"{first_line(e)}; usage: llmtune push TARGET OWNER/NAME") from None
    run = _merge_source(target) if merged else None
    # A bad target, a missing token and an unreachable Hub are all refused before a merge that can take minutes.
    own = files_to_push(target) if run is None else None
    if not dry_run:
        token = _hub_ready(repo_id, token)
    with _merged(target, run) if run is not None else nullcontext(own) as pairs:
        files = [(name, local.stat().st_size) for local, name in pairs]
        if dry_run:
            return PushResult(repo_id=repo_id, url=None, files=files, private=private)
        url = _upload(pairs, repo_id, private, token)
    return PushResult(repo_id=repo_id, url=url, files=files, private=private)


def _merge_source(target: Path) -> RunDir | None:
    """The run whose adapter `--merged` merges, refused now (before any token or network) if it cannot be merged;
    None when the target already is a standalone model."""
    if not is_run_dir(target):
        return None
    run = open_run(target)
    method = run.recipe().method
    if not method.saves_adapter:
        return None
    if (refusal := method.merge_refusal(str(target))) is not None:
        raise LLMTuneError(f"{target}: {refusal}; push without --merged to upload the adapter itself")
    return run


@contextmanager
def _merged(target: Path, run: RunDir) -> Iterator[list[tuple[Path, str]]]:
    """The run merged into a temporary directory, with the run's records beside the merged model."""
    from llmtune.merge import merge_adapter

    with tempfile.TemporaryDirectory(prefix="llmtune-push-") as tmp:
        result = merge_adapter(target, Path(tmp) / "merged")
        pairs = files_to_push(result.out)
        names = {name for _, name in pairs}
        # The merged directory has its own model card (merged=True); the run adds how it was made.
        pairs += [(run.file(n), n) for n in RUN_RECORDS if n not in names and run.file(n).is_file()]
        yield pairs


def _unreachable(repo_id: str) -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return f"push to {repo_id}: could not reach the Hugging Face Hub at {endpoint}; check the network (and HF_ENDPOINT)"


def _hub_ready(repo_id: str, token: str | None) -> str:
    """The token to upload with, once the Hub is known to answer; else a one-line error, within seconds."""
    token = token or get_token()
    if not token:
        raise LLMTuneError(f"push to {repo_id}: no Hugging Face token; {LOGIN_HINT}")
    if constants.HF_HUB_OFFLINE:
        raise LLMTuneError(f"push to {repo_id}: HF_HUB_OFFLINE is set, so the Hub is not contacted; unset it")
    # huggingface_hub's HTTP client has no timeout of its own: an unreachable host would hang, not fail.
    if not hub_reachable():
        raise LLMTuneError(_unreachable(repo_id))
    return token


def _upload(pairs: list[tuple[Path, str]], repo_id: str, private: bool, token: str) -> str:
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(local)) for local, name in pairs]
        commit = api.create_commit(
            repo_id, operations, repo_type="model", commit_message=f"Upload {len(pairs)} files with llmtune push"
        )
    except HfHubHTTPError as e:
        raise LLMTuneError(_refusal(e, repo_id)) from None
    except (HTTPError, OSError) as e:  # the connection failed after the probe succeeded
        raise LLMTuneError(f"{_unreachable(repo_id)} ({first_line(e)})") from None
    return commit.commit_url


def _refusal(error: HfHubHTTPError, repo_id: str) -> str:
    status = error.response.status_code if error.response is not None else None
    if status == 401:
        return f"push to {repo_id}: the Hub rejected the token (401); {LOGIN_HINT}"
    if status == 403:
        return f"push to {repo_id}: the token may not write to {repo_id} (403); use a token with write access to it"
    return f"push to {repo_id}: the Hub refused the upload ({status}): {first_line(error)}"


def _files(directory: Path, recursive: bool = False) -> list[Path]:
    # Hidden names are staging leftovers (artifacts.staged_dir) and caches, never part of the model.
    if not directory.is_dir():
        return []
    found = directory.rglob("*") if recursive else directory.iterdir()
    return sorted(
        p for p in found if p.is_file() and not any(s.startswith(".") for s in p.relative_to(directory).parts)
    )
