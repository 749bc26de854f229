"""`qlc publish RUN --to hf:ORG/NAME`: one Hub commit of exactly the run's certified files.

The upload is planned first, offline: a list of huggingface_hub `CommitOperationAdd`, each
built from a file whose sha256 the run's records certify (huggingface_hub hashes the file
again when it builds the operation, and that hash must be the certified one). `--dry-run`
prints that plan; a real publish creates the repository (private unless --public) and sends
the plan as one commit, so the repository never shows half a run.

Repository layout: the adapter directory's files at the root (adapter_config.json at the root
is what `AutoPeftModelForCausalLM.from_pretrained("ORG/NAME")` reads; the card adapter/README.md
becomes the repository's README.md), beside manifest.json, manifest.sha256 and report.md. The
manifest's subject `adapter/X` is the repository's `X`. With --merged, the verified merge
(qlc merge, run into a temporary directory) replaces the adapter files and a card for the
merged model, built with huggingface_hub's ModelCardData, replaces the adapter's card.

The card is checked offline with huggingface_hub's own parsing (`ModelCard`, the Hub's YAML
block regex, `ModelCardData` strict): `RepoCard.validate` posts to the Hub's validate-yaml
endpoint, which is not reachable offline, so it is not called. The token comes from HF_TOKEN
in the environment only; it is passed to huggingface_hub and never printed or stored.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from qlc.contract import ADAPTER_DIR, MODEL_CARD_FILE, sha256_file
from qlc.runtime.publish import PublishError, RunFile, card_text, verified_run

TOKEN_ENV = "HF_TOKEN"
MERGED_DTYPE = "bf16"


class HubError(Exception):
    """The Hub refused or could not be reached; nothing or the whole commit landed."""


class Hub(Protocol):
    """The Hugging Face Hub seam: create a repository, commit operations to it."""

    def create_repo(self, repo_id: str, private: bool, token: str) -> None: ...
    def create_commit(
        self, repo_id: str, operations: list[Any], message: str, description: str, token: str
    ) -> str: ...


class HfHub:
    """huggingface_hub's HfApi, at `endpoint` or the one huggingface_hub is configured for."""

    def __init__(self, endpoint: str | None = None) -> None:
        self.endpoint = endpoint

    def create_repo(self, repo_id: str, private: bool, token: str) -> None:
        from huggingface_hub import HfApi

        try:
            HfApi(endpoint=self.endpoint).create_repo(
                repo_id, token=token, private=private, exist_ok=True
            )
        except Exception as error:  # huggingface_hub's HTTP and transport errors
            raise HubError(f"cannot create hf:{repo_id}: {error}") from None

    def create_commit(
        self, repo_id: str, operations: list[Any], message: str, description: str, token: str
    ) -> str:
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=self.endpoint).create_commit(
                repo_id,
                operations,
                commit_message=message,
                commit_description=description,
                token=token,
            )
        except Exception as error:  # huggingface_hub's HTTP and transport errors
            raise HubError(f"the commit to hf:{repo_id} failed: {error}") from None
        return str(info.commit_url)


@dataclass(frozen=True)
class HubUpload:
    repo_id: str
    private: bool
    merged: bool
    operations: list[Any]  # huggingface_hub.CommitOperationAdd, in path order
    message: str
    description: str

    def lines(self) -> list[str]:
        """What would be committed: one line per file (path, size, sha256)."""
        shown = "private" if self.private else "public"
        head = [f"hf:{self.repo_id} ({shown}), one commit: {self.message}"]
        return head + [
            f"  {op.path_in_repo}  {op.upload_info.size} bytes  sha256:"
            f"{op.upload_info.sha256.hex()}"
            for op in self.operations
        ]


def check_repo_id(name: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    if name.count("/") != 1:
        raise PublishError(f"--to hf:{name}: give the repository as hf:ORG/NAME")
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise PublishError(f"--to hf:{name}: {error}") from None
    return name


def hub_token() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise PublishError(
            f"no Hugging Face token: set {TOKEN_ENV} in the environment (a write token); "
            "nothing was uploaded"
        )
    return token


def check_card(text: str) -> Any:
    """The card parsed by huggingface_hub as the Hub parses it; PublishError when it would not
    pass: no YAML block, metadata that is not a mapping or that ModelCardData rejects, a
    base_model that is not a Hub model id."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.repocard import REGEX_YAML_BLOCK
    from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]

    if REGEX_YAML_BLOCK.search(text) is None:
        raise PublishError("the model card has no YAML metadata block (--- ... ---)")
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, TypeError) as error:
        raise PublishError(f"the model card's metadata is not valid: {error}") from None
    base = getattr(card.data, "base_model", None)
    for model_id in [base] if isinstance(base, str) else list(base or []):
        try:
            validate_repo_id(model_id)
        except HFValidationError:
            raise PublishError(
                f"the model card's base_model {model_id!r} is not a Hub model id (the run "
                "trained on a local model): the Hub would not link it"
            ) from None
    return card


def operation(path_in_repo: str, source: Path | bytes, expected: str | None) -> Any:
    """A CommitOperationAdd; its own sha256 must be the certified one."""
    from huggingface_hub import CommitOperationAdd

    added = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=source)
    if expected is not None and added.upload_info.sha256.hex() != expected:
        raise PublishError(
            f"{path_in_repo}: changed while the upload was planned; nothing was sent"
        )
    return added


def repo_path(name: str) -> str:
    """adapter/X -> X; the run's records keep their names."""
    prefix = f"{ADAPTER_DIR}/"
    return name[len(prefix) :] if name.startswith(prefix) else name


def adapter_operations(files: list[RunFile]) -> list[Any]:
    check_card(card_text(files))
    return [operation(repo_path(f.name), f.path, f.sha256) for f in files]


def merged_card(adapter_card: str, record: Any) -> str:
    """The merged model's card: huggingface_hub's ModelCardData for the header, the numbers
    of the merge's verification, then the adapter card's body (its provenance)."""
    from huggingface_hub import ModelCardData

    adapter = check_card(adapter_card)
    data = ModelCardData(
        base_model=adapter.data.base_model,
        library_name="transformers",
        datasets=adapter.data.datasets,
        tags=["qlora", "qlc", "merged-lora"],
        pipeline_tag="text-generation",
    )
    tolerance = record.tolerance
    body = [
        f"# Merged: {adapter.data.base_model} with a QLoRA adapter trained by qlc",
        "",
        f"The adapter was merged into the base weights in {record.dtype} by `qlc merge`, which "
        f"verified the merged model's logits against base + adapter on {record.prompts} "
        f"held-out prompts: max |difference| {record.max_abs_diff:.4g} <= bound "
        f"{tolerance['bound']:.4g} ({tolerance['rule']}); the adapter's own effect on the "
        f"logits is {record.adapter_effect_max_abs:.4g}. merge.json holds the record.",
        "",
        "## The adapter (its card as trained)",
        "",
        adapter.text.strip(),
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def merged_operations(
    run: Path, files: list[RunFile], model: Path | None, workdir: Path
) -> list[Any]:
    from qlc.runtime.merge import merge

    merged_dir = workdir / "merged"
    record = merge(run, merged_dir, MERGED_DTYPE, model)
    card = merged_card(card_text(files), record).encode()
    check_card(card.decode())
    operations = [
        operation(name, merged_dir / name, record.files.get(name))
        for name in sorted(p.relative_to(merged_dir).as_posix() for p in merged_dir.rglob("*"))
        if (merged_dir / name).is_file()
    ]
    operations.append(operation(MODEL_CARD_FILE, card, None))
    records = [f for f in files if not f.name.startswith(f"{ADAPTER_DIR}/")]
    return operations + [operation(f.name, f.path, f.sha256) for f in records]


@contextlib.contextmanager
def planned_upload(
    run: Path,
    repo: str,
    merged: bool = False,
    private: bool = True,
    model: Path | None = None,
) -> Iterator[HubUpload]:
    """The commit a publish would make, planned offline (with --merged, the merge lives in a
    temporary directory until the context ends)."""
    repo_id = check_repo_id(repo)
    inputs, files = verified_run(run, model)
    run_id = (inputs.manifest["predicate"].get("run") or {}).get("run_id") or inputs.run_dir.name
    job = (inputs.manifest["predicate"].get("spec") or {}).get("name") or "run"
    with tempfile.TemporaryDirectory(prefix="qlc-publish-") as workdir:
        if merged:
            operations = merged_operations(inputs.run_dir, files, model, Path(workdir))
        else:
            operations = adapter_operations(files)
        operations.sort(key=lambda op: op.path_in_repo)
        manifest_sha = sha256_file(inputs.run_dir / "manifest.json")
        what = "merged model" if merged else "adapter"
        yield HubUpload(
            repo_id=repo_id,
            private=private,
            merged=merged,
            operations=operations,
            message=f"qlc publish: {what} of {job} run {run_id}",
            description=f"Published by qlc from the run whose manifest.json has sha256 "
            f"{manifest_sha}."
            + ("" if merged else " The manifest's subject adapter/X is this repository's X."),
        )


def upload(plan: HubUpload, hub: Hub, token: str) -> str:
    """Create the repository (private unless asked) and commit the plan; the commit URL."""
    hub.create_repo(plan.repo_id, plan.private, token)
    return hub.create_commit(plan.repo_id, plan.operations, plan.message, plan.description, token)
