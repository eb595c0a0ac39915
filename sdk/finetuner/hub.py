"""Publishing a fine-tuned model on the Hugging Face hub (``Run.push_to_hub``).

The artifact is downloaded, checked and prepared in a local folder first (:func:`prepare_folder`): the
model in its library's format, ``finetuner.json`` (so ``finetuner.get_model('org/name')`` loads it back)
and the model card ``README.md`` the trainer wrote, with ``base_model``, ``library_name``,
``pipeline_tag``, tags and the metrics (``model-index``) in its YAML. Files that only matter to this
installation are left out: ``manifest.json`` holds the run's spec, whose data URIs name buckets and
paths of this cluster. Then ``huggingface_hub`` creates the repository and uploads the folder.

The folder and its metadata are what the tests check, offline; the upload itself needs the hub and a
token, and is not exercised by this project's tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetuner.errors import ArgumentError, BackendError

LEFT_OUT = ('manifest.json',)  # this installation's own bookkeeping (the run's spec, data URIs)
REPO_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$')


@dataclass(frozen=True)
class HubUpload:
    """What was (or would be) published: the repository, the prepared folder and its files."""

    repo_id: str
    folder: Path
    files: tuple[str, ...]
    metadata: dict[str, Any]
    url: str | None = None


def check_repo_id(repo_id: Any) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or '--' in repo_id or '..' in repo_id:
        raise ArgumentError(
            'repo_id', f'{repo_id!r} is not a Hugging Face repository id; write it as "user-or-org/model-name"'
        )
    return repo_id


def prepare_folder(folder: Path, repo_id: str, run_name: str) -> HubUpload:
    """Check a downloaded artifact for the hub and remove what stays here; the files to upload."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    if not (folder / 'finetuner.json').is_file():
        raise BackendError(f'the artifact of run {run_name!r} has no finetuner.json; it cannot be published')
    readme = folder / 'README.md'
    if not readme.is_file():
        raise BackendError(
            f'the artifact of run {run_name!r} has no model card (README.md): it was made by an older trainer; '
            'run it again to get one'
        )
    for name in LEFT_OUT:
        (folder / name).unlink(missing_ok=True)
    card = ModelCard.load(readme)
    for placeholder in ('<this folder or repo id>', 'sentence_transformers_model_id'):
        card.text = card.text.replace(placeholder, repo_id)
    card.save(readme)
    description = json.loads((folder / 'finetuner.json').read_text())
    files = tuple(sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()))
    metadata = {**card.data.to_dict(), 'finetuner_family': description.get('family')}
    return HubUpload(repo_id, folder, files, metadata)


def upload(prepared: HubUpload, token: str | None, private: bool, commit_message: str) -> HubUpload:
    """Create the repository (kept when it exists) and upload the prepared folder in one commit."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ArgumentError('repo_id', 'pushing to the hub needs huggingface_hub: pip install huggingface_hub') from e
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id=prepared.repo_id, private=private, exist_ok=True, repo_type='model')
        api.upload_folder(
            folder_path=str(prepared.folder),
            repo_id=prepared.repo_id,
            repo_type='model',
            commit_message=commit_message,
        )
    except Exception as e:  # HfHubHTTPError, connection errors, OfflineModeIsEnabled
        raise BackendError(f'cannot push to the Hugging Face hub repository {prepared.repo_id!r}: {e}') from e
    url = str(getattr(repo, 'url', '') or f'https://huggingface.co/{prepared.repo_id}')
    return HubUpload(prepared.repo_id, prepared.folder, prepared.files, prepared.metadata, url)
