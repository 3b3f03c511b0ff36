# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""How ``save_pretrained`` and ``push_to_hub`` of QA-LoRA models come to write the QA-LoRA model card.

``import peft_qalora`` wraps two methods of ``peft.PeftModel`` (:func:`install_peft_hooks`); both do exactly what
they did before for every model that holds no QALORA adapter:

- ``create_or_update_model_card`` (what ``save_pretrained`` calls) adds the QA-LoRA metadata and section to the card
  PEFT writes;
- ``push_to_hub`` saves into a temporary folder and uploads it with ``HfApi().upload_folder``, card included.
  transformers' implementation, which PEFT inherits, would replace the card with a generic one.

The model ``merge_and_unload()`` returns gets its own ``save_pretrained`` and ``push_to_hub``
(:func:`attach_merged_card`, set on that instance only), since transformers' write no card or a generic one.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any, Optional, Union

from huggingface_hub import ModelCard

from .card_facts import CARD_NAME, CardFacts, adapter_facts, qalora_configs
from .hub_upload import push_folder, push_saved
from .model_card import write_card


def _hooked(function: Callable) -> bool:
    return getattr(function, "_peft_qalora_hook", False)


def install_peft_hooks() -> None:
    """Make ``PeftModel.save_pretrained`` and ``push_to_hub`` write the QA-LoRA card for QALORA models.

    Other models go through PEFT's and transformers' code unchanged. A second call installs nothing twice.
    """
    from peft import PeftModel

    if not _hooked(PeftModel.create_or_update_model_card):
        original_card = PeftModel.create_or_update_model_card

        @functools.wraps(original_card)
        def create_or_update_model_card(self, output_dir: str):
            if not qalora_configs(self):
                return original_card(self, output_dir)
            path = os.path.join(output_dir, CARD_NAME)
            # PEFT replaces the tags of a card it updates; keep those the card already had.
            kept = (ModelCard.load(path, ignore_metadata_errors=True).data.tags or []) if os.path.isfile(path) else []
            original_card(self, output_dir)
            write_card(output_dir, adapter_facts(self), tags=kept)

        create_or_update_model_card._peft_qalora_hook = True
        PeftModel.create_or_update_model_card = create_or_update_model_card

    if not _hooked(PeftModel.push_to_hub):
        original_push = PeftModel.push_to_hub

        @functools.wraps(original_push)
        def push_to_hub(self, *args, **kwargs):
            if not qalora_configs(self):
                return original_push(self, *args, **kwargs)
            return _push_peft_model(self, *args, **kwargs)

        push_to_hub._peft_qalora_hook = True
        PeftModel.push_to_hub = push_to_hub


def _push_with_card(
    model: Any,
    repo_id: str,
    default_message: str,
    *,
    commit_message: Optional[str] = None,
    max_shard_size: Optional[Union[int, str]] = "50GB",
    **hub_options: Any,
):
    """``push_to_hub`` of a model whose ``save_pretrained`` writes the QA-LoRA card (transformers' arguments).

    ``max_shard_size`` goes to ``save_pretrained``; the rest (``commit_description``, ``private``, ``token``,
    ``revision``, ``create_pr``, ``tags``) to :func:`~peft_qalora.hub_upload.push_saved`.
    """
    return push_saved(
        lambda folder: model.save_pretrained(folder, max_shard_size=max_shard_size),
        repo_id,
        commit_message=commit_message or default_message,
        **hub_options,
    )


def _push_peft_model(model: Any, repo_id: str, **kwargs: Any):
    """``PeftModel.push_to_hub`` for QALORA models (the same arguments as transformers' ``push_to_hub``)."""
    return _push_with_card(model, repo_id, "Upload QA-LoRA adapter", **kwargs)


# ------------------------------------------------------------------------------------------------ merged models


def attach_merged_card(model: Any, facts: CardFacts) -> None:
    """Give a model returned by ``merge_and_unload()`` a card: its ``save_pretrained`` writes ``README.md`` too.

    transformers' ``save_pretrained`` writes no card and its ``push_to_hub`` uploads a generic one, so this merged
    model (and only it: the methods are set on the instance) saves and pushes with the QA-LoRA card.
    """
    model.qalora_card_facts = facts
    model.save_pretrained = types.MethodType(_merged_save_pretrained, model)
    model.push_to_hub = types.MethodType(_merged_push_to_hub, model)


def _merged_save_pretrained(self, save_directory, *args, **kwargs):
    push = kwargs.pop("push_to_hub", False)
    hub = {key: kwargs.pop(key) for key in ("repo_id", "commit_message", "create_pr", "private") if key in kwargs}
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    is_main_process = args[0] if args else kwargs.get("is_main_process", True)
    if is_main_process:
        write_card(save_directory, self.qalora_card_facts)
        if push:  # transformers' own push here would replace the card with a generic one
            repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(os.fspath(save_directory))))
            push_folder(save_directory, repo_id, token=kwargs.get("token"), **hub)
    return result


_merged_save_pretrained.__name__ = "save_pretrained"  # the name the bound method shows


def _merged_push_to_hub(self, repo_id: str, *, tags: Optional[list[str]] = None, **kwargs: Any):
    """``push_to_hub`` of a merged model: uploads the checkpoint with its QA-LoRA card."""
    model_tags = list(getattr(self, "model_tags", None) or [])
    return _push_with_card(self, repo_id, "Upload QA-LoRA merged model", tags=[*model_tags, *(tags or [])], **kwargs)


_merged_push_to_hub.__name__ = "push_to_hub"
