# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Uploads of QA-LoRA outputs to the Hugging Face Hub, with ``HfApi``, their model card naming the repository.

:func:`push_folder` and :func:`push_file` upload what the command line wrote (a merged checkpoint, an export);
:func:`push_saved` is ``push_to_hub`` of QA-LoRA models (``save_hooks.py``): it saves into a temporary folder and
uploads that, updating a card already in the repository instead of replacing it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Optional, Union

from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError

from .card_facts import CARD_NAME, facts_from_card
from .model_card import update_card


def _name_repo_in_card(folder: str, repo_id: str, tags: Iterable[str] = ()) -> None:
    """Let the QA-LoRA card in ``folder`` name ``repo_id`` in its snippets, and add ``tags``."""
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path):
        return
    card = ModelCard.load(path, ignore_metadata_errors=True)
    facts = facts_from_card(card)
    if facts is not None:
        update_card(card, facts, repo_id=repo_id)
    if tags:
        card.data.tags = sorted({*(card.data.tags or []), *tags})
    card.save(path)


def _upload(api: HfApi, folder: str, repo_id: str, token, revision, create_pr, commit_message, commit_description):
    if revision is not None and not create_pr and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def push_folder(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
):
    """Upload a written output folder (a merged checkpoint, an export) to ``repo_id``, creating the repository.

    ``HfApi().create_repo(exist_ok=True)``, then ``HfApi().upload_folder`` of the folder as it is, after its QA-LoRA
    card (if any) has been updated to name ``repo_id`` in its code snippets.

    Returns:
        The ``CommitInfo`` of the upload.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    _name_repo_in_card(os.fspath(folder), repo_id)
    commit_message = commit_message or "Upload QA-LoRA model"
    return _upload(api, folder, repo_id, token, revision, create_pr, commit_message, commit_description)


def push_file(
    path: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    commit_message: Optional[str] = None,
):
    """Upload one written file (a GGUF export) to ``repo_id`` under its own name, creating the repository.

    Returns:
        The ``CommitInfo`` of the upload.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    name = os.path.basename(os.fspath(path))
    return api.upload_file(
        path_or_fileobj=os.fspath(path),
        path_in_repo=name,
        repo_id=repo_id,
        token=token,
        commit_message=commit_message or f"Upload {name}",
    )


def _remote_card(repo_id: str, token: Optional[Union[str, bool]]) -> Optional[ModelCard]:
    try:
        return ModelCard.load(repo_id, token=token, ignore_metadata_errors=True)
    except EntryNotFoundError:
        return None


def push_saved(
    save: Callable[[str], None],
    repo_id: str,
    *,
    commit_message: Optional[str] = None,
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    tags: Optional[Iterable[str]] = None,
):
    """``push_to_hub`` of QA-LoRA models: ``save`` (which writes the card) into a temporary folder and upload it.

    A card already in the repository is updated rather than replaced (its text and metadata kept, our section
    rewritten), as PEFT's ``save_pretrained`` updates a card already in its output folder.
    """
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        remote = _remote_card(repo_id, token)
        if remote is not None:
            remote.save(os.path.join(tmp, CARD_NAME))
        save(tmp)
        _name_repo_in_card(tmp, repo_id, tags or ())
        return _upload(api, tmp, repo_id, token, revision, create_pr, commit_message, commit_description)
