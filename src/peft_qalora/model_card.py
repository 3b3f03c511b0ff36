# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Model cards (the ``README.md`` beside adapters, merged checkpoints and exports) and uploads to the Hub.

Every card carries Hub metadata (``library_name``, ``base_model``, ``tags``, ``pipeline_tag``), a ``qalora`` metadata
block (the base's GPTQ quantization, the adapter's rank and targets, and for merged outputs the zero format and the
merge report) and a section, between two HTML comments, that says how to load the files. Loading an adapter or a
float-zero merge needs ``pip install peft-qalora`` and ``import peft_qalora``; PEFT alone fails with
``KeyError: 'QALORA'``, so the card says so.

Cards are written with ``huggingface_hub.ModelCard`` / ``ModelCardData``. Writing into a folder that already has a
``README.md`` updates it: the metadata is merged and only the section between the comments is replaced.

``import peft_qalora`` wraps two methods of ``peft.PeftModel`` (:func:`install_peft_hooks`); both do exactly what
they did before for every model that holds no QALORA adapter:

- ``create_or_update_model_card`` (what ``save_pretrained`` calls) adds the QA-LoRA metadata and section to the card
  PEFT writes;
- ``push_to_hub`` saves into a temporary folder and uploads it with ``HfApi().upload_folder``, card included.
  transformers' implementation, which PEFT inherits, would replace the card with a generic one.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from huggingface_hub import HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError
from peft.utils import CONFIG_NAME

from .checkpoint import model_architecture
from .peft_type import QALORA

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
KINDS = ("adapter", "merged", "gguf", "mlx")
METADATA_KEY = "qalora"
TAGS = ("qalora", "gptq")
PAPER = "https://arxiv.org/abs/2309.14717"
PROJECT = "https://github.com/peft-qalora/peft-qalora"
SECTION_BEGIN = "<!-- peft-qalora: begin (generated; edits between these comments are replaced on the next save) -->"
SECTION_END = "<!-- peft-qalora: end -->"

_LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "mlx": "mlx"}
_KIND_TAGS = {"adapter": (), "merged": ("merged",), "gguf": ("gguf",), "mlx": ("mlx",)}
# Metadata a derived model inherits from its base's card when the base is a local folder.
_INHERITED = ("license", "license_name", "license_link", "language")
_QUANTIZATION_LABELS = {
    "quant_method": "method",
    "bits": "bits",
    "group_size": "group size",
    "desc_act": "act-order (`desc_act`)",
    "sym": "symmetric",
    "checkpoint_format": "zero-point format",
}
_PLACEHOLDER_REPO = "PATH_OR_REPO_ID"
_PLACEHOLDER_BASE = "BASE_MODEL"


@dataclass
class CardFacts:
    """What a card says, independent of where the files came from.

    Args:
        kind: ``"adapter"``, ``"merged"``, ``"gguf"`` or ``"mlx"``.
        base_model: Hub id (or local path) of the GPTQ base model.
        quantization: The base's GPTQ settings (``bits``, ``group_size``, ``desc_act``, ``sym``,
            ``checkpoint_format``, ...).
        adapters: ``{adapter name: summary}`` (see :func:`adapter_summary`).
        merge: For merged outputs and exports: zero format, storage and (integer zeros) the rounding report.
        export: Format-specific facts of an export, shown as given (e.g. ``{"format": "Q4_1", "file": "x.gguf"}``).
        pipeline_tag: Hub pipeline tag (``"text-generation"`` for causal language models).
        inherited: Metadata taken over from the base's card (license, language).
    """

    kind: str
    base_model: Optional[str] = None
    quantization: Optional[dict] = None
    adapters: dict[str, dict] = field(default_factory=dict)
    merge: Optional[dict] = None
    export: Optional[dict] = None
    pipeline_tag: Optional[str] = None
    inherited: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}.")
        # Plain YAML types only: configs hold str enums (QuantizationMethod) and sets.
        self.quantization, self.adapters, self.merge, self.export = _plain(
            [self.quantization, self.adapters, self.merge, self.export]
        )

    def metadata(self) -> dict:
        """The ``qalora`` block of the card's YAML metadata."""
        block: dict[str, Any] = {"kind": self.kind}
        if self.quantization:
            block["quantization"] = dict(self.quantization)
        if self.adapters:
            block["adapters"] = {name: dict(summary) for name, summary in self.adapters.items()}
        if self.merge:
            block["merge"] = dict(self.merge)
        if self.export:
            block["export"] = dict(self.export)
        return block


def _plain(value: Any) -> Any:
    """``value`` as JSON types (str enums become their strings, sets sorted lists)."""

    def default(item: Any) -> Any:
        return sorted(item) if isinstance(item, (set, frozenset)) else str(item)

    return json.loads(json.dumps(value, default=default))


# ------------------------------------------------------------------------------------------------ facts


def adapter_summary(config: Any) -> dict:
    """Rank, alpha and targets of a QA-LoRA adapter config (a ``QALoraConfig`` or its dict)."""
    values = config if isinstance(config, dict) else config.to_dict()
    layers = sorted(values.get("base_layers") or {})
    targets = values.get("target_modules")
    summary: dict[str, Any] = {"r": values.get("r"), "lora_alpha": values.get("lora_alpha")}
    if layers:
        summary["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in layers})
        summary["layers"] = len(layers)
    elif isinstance(targets, str):
        summary["target_modules"] = targets
    elif targets:
        summary["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in targets})
    for key in ("use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if values.get(key):
            value = values[key]
            summary[key] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return summary


def merge_summary(zero_format: str, report: Any = None) -> dict:
    """The ``merge`` facts of a merged output: zero format, how it is stored, and the rounding report if any."""
    if zero_format == "float":
        return {"zero_format": "float", "exact": True, "quant_method": "peft_qalora", "format": "gptq_float_zeros"}
    if zero_format != "int":
        raise ValueError(f"zero_format must be 'float' or 'int', got {zero_format!r}.")
    merge: dict[str, Any] = {"zero_format": "int", "quant_method": "gptq", "format": "gptq_v2"}
    if report is not None:
        merge.update(
            exact=report.lost == 0,
            kept=round(float(report.kept), 4),
            max_error_steps=round(float(report.max_error_steps), 4),
            clamped_zero_points=int(report.clamped_groups),
            layers=len(report.layers),
        )
    return merge


def pipeline_tag_for(architecture: Optional[str]) -> Optional[str]:
    """``"text-generation"`` for a causal language model class name, else ``None``."""
    return "text-generation" if architecture and architecture.endswith("ForCausalLM") else None


def base_card_metadata(base_model: Optional[str]) -> dict:
    """License and language from the base's ``README.md`` when the base is a local folder (never the network)."""
    path = os.path.join(base_model, CARD_NAME) if base_model and os.path.isdir(base_model) else None
    if path is None or not os.path.isfile(path):
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except Exception as exc:  # a broken base card must not stop a save
        logger.warning("Could not read the base model's card %s: %s", path, exc)
        return {}
    return {key: data[key] for key in _INHERITED if data.get(key)}


def merged_facts(
    configs: dict[str, Any],
    zero_format: str,
    report: Any = None,
    architecture: Optional[str] = None,
    quantization: Optional[dict] = None,
) -> CardFacts:
    """Facts of a merged checkpoint, the same from ``merge_and_unload()`` and ``merge_checkpoint()``.

    Args:
        configs: ``{adapter name: QALoraConfig or its dict}`` of the merged adapters.
        zero_format: ``"float"`` or ``"int"``.
        report: The :class:`~peft_qalora.MergeReport` of an integer merge.
        architecture: The model class name (``config.architectures[0]``).
        quantization: The base's GPTQ settings when the adapter did not record them.
    """
    first = next(iter(configs.values()))
    values = first if isinstance(first, dict) else first.to_dict()
    base_model = values.get("base_model_name_or_path")
    quantization = values.get("base_quantization") or quantization or {}
    return CardFacts(
        kind="merged",
        base_model=base_model,
        quantization={key: quantization[key] for key in _QUANTIZATION_LABELS if key in quantization} or None,
        adapters={name: adapter_summary(config) for name, config in configs.items()},
        merge=merge_summary(zero_format, report),
        pipeline_tag=pipeline_tag_for(architecture),
        inherited=base_card_metadata(base_model),
    )


# ------------------------------------------------------------------------------------------------ writing


def _usage(facts: CardFacts, repo_id: Optional[str]) -> list[str]:
    repo = repo_id or _PLACEHOLDER_REPO
    base = facts.base_model or _PLACEHOLDER_BASE
    install = ["```bash", "pip install peft-qalora", "```", ""]
    if facts.kind == "adapter":
        return [
            "PEFT alone does not know the `QALORA` adapter type: without `import peft_qalora`, "
            "`PeftModel.from_pretrained` fails with `KeyError: 'QALORA'`.",
            "",
            *install,
            "```python",
            "import peft_qalora  # registers the QALORA adapter type with PEFT",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{base}")',
            f'model = PeftModel.from_pretrained(base, "{repo}")',
            "merged = model.merge_and_unload()  # optional: fold the adapter into the GPTQ zero points",
            "```",
            "",
            "`peft-qalora convert ADAPTER_DIR OUT_DIR --to lora` turns it into a plain LoRA adapter with the same "
            "function, which stock PEFT, vLLM and SGLang apply to the unchanged GPTQ base.",
        ]
    if facts.kind == "merged" and (facts.merge or {}).get("zero_format") == "int":
        return [
            "A standard GPTQ checkpoint (`gptq_v2` zero points): stock transformers with GPTQModel loads it, no plugin "
            "needed.",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "```",
        ]
    if facts.kind == "merged":
        return [
            'Its zero points are real numbers (`quant_method: "peft_qalora"`), so loading needs `peft-qalora`: stock '
            "transformers stops with a size-mismatch error instead of loading a wrong model.",
            "",
            *install,
            "```python",
            'import peft_qalora  # registers the "peft_qalora" quantization format with transformers',
            "from transformers import AutoModelForCausalLM",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            "```",
        ]
    if facts.kind == "mlx":
        return [
            "```python",
            "from mlx_lm import generate, load",
            "",
            f'model, tokenizer = load("{repo}")',
            "```",
        ]
    gguf_file = (facts.export or {}).get("file", "MODEL.gguf")
    return ["```bash", f"llama-cli -m {gguf_file}", "```"]


def _intro(facts: CardFacts) -> str:
    base = f"`{facts.base_model}`" if facts.base_model else "a GPTQ model"
    qalora = f"[QA-LoRA]({PAPER})"
    if facts.kind == "adapter":
        return (
            f"A {qalora} adapter for the GPTQ model {base}, made with [peft-qalora]({PROJECT}), a PEFT plugin. The "
            "adapter sees its input averaged over each quantization group, so it can be merged into the GPTQ zero "
            "points: the result is a quantized model again, with no adapter left over."
        )
    if facts.kind == "merged":
        how = (
            "real-valued (fp32) zero points, an exact merge"
            if (facts.merge or {}).get("zero_format") != "int"
            else "zero points rounded to the integer GPTQ grid"
        )
        return (
            f"The GPTQ model {base} with a {qalora} adapter merged into its zero points ({how}), made with "
            f"[peft-qalora]({PROJECT}). The packed codes, scales and act-order map are the base's, unchanged."
        )
    fmt = "GGUF" if facts.kind == "gguf" else "MLX"
    merged = f", with a {qalora} adapter merged in" if facts.adapters else ""
    return (
        f"An exact {fmt} export of the GPTQ model {base}{merged}, made with [peft-qalora]({PROJECT}): the GPTQ codes "
        "and scales are kept and each group's offset is stored as a real number."
    )


def _table(rows: Iterable[tuple[str, Any]]) -> list[str]:
    def show(value: Any) -> str:
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, (list, tuple, set)):
            return ", ".join(f"`{item}`" for item in value)
        if isinstance(value, dict):
            return ", ".join(f"`{key}`: {item}" for key, item in value.items())
        return str(value)

    return ["| | |", "|---|---|", *(f"| {label} | {show(value)} |" for label, value in rows if value is not None)]


def _section(facts: CardFacts, repo_id: Optional[str]) -> str:
    lines = [SECTION_BEGIN, "## QA-LoRA", "", _intro(facts), "", "### How to use", "", *_usage(facts, repo_id), ""]
    if facts.quantization:
        known = [(label, facts.quantization.get(key)) for key, label in _QUANTIZATION_LABELS.items()]
        lines += ["### Quantization of the base model", "", *_table(known), ""]
    for name, summary in facts.adapters.items():
        title = "### Adapter" if len(facts.adapters) == 1 else f"### Adapter `{name}`"
        rows = [
            ("rank `r`", summary.get("r")),
            ("`lora_alpha`", summary.get("lora_alpha")),
            ("targets", summary.get("target_modules")),
            ("adapted layers", summary.get("layers")),
            ("rank-stabilized scaling", summary.get("use_rslora")),
            ("`rank_pattern`", summary.get("rank_pattern")),
            ("`alpha_pattern`", summary.get("alpha_pattern")),
            ("modules trained fully", summary.get("modules_to_save")),
        ]
        lines += [title, "", *_table(rows), ""]
    if facts.merge:
        merge = facts.merge
        rows = [
            ("zero points", "real-valued (fp32)" if merge.get("zero_format") == "float" else "integers"),
            ("stored as", f'`quant_method: "{merge.get("quant_method")}"`, format `{merge.get("format")}`'),
            ("exact", merge.get("exact")),
        ]
        if "kept" in merge:
            rows += [
                ("adapter effect kept after rounding", f"{merge['kept']:.2%}"),
                ("largest rounding error", f"{merge['max_error_steps']} quantization steps"),
                ("zero points clamped", merge["clamped_zero_points"]),
                ("merged layers", merge["layers"]),
            ]
        lines += ["### Merge", "", *_table(rows), ""]
    if facts.export:
        lines += ["### Export", "", *_table(facts.export.items()), ""]
    lines.append(SECTION_END)
    return "\n".join(lines)


def _with_section(text: str, section: str) -> str:
    """``text`` with our section replaced, or inserted under the first title (at the top if there is none)."""
    pattern = re.compile(re.escape(SECTION_BEGIN) + r".*?" + re.escape(SECTION_END), flags=re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: section, text, count=1)
    lines = text.splitlines()
    title = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
    if title is None:
        return f"{section}\n\n{text.lstrip()}" if text.strip() else f"{section}\n"
    return "\n".join([*lines[: title + 1], "", section, "", *lines[title + 1 :]])


def _title(facts: CardFacts) -> str:
    name = os.path.basename(os.path.normpath(facts.base_model)) if facts.base_model else "GPTQ model"
    what = {"adapter": "QA-LoRA adapter", "merged": "QA-LoRA merged", "gguf": "GGUF", "mlx": "MLX"}[facts.kind]
    return f"{name} ({what})"


def update_card(card: ModelCard, facts: CardFacts, repo_id: Optional[str] = None, tags: Iterable[str] = ()) -> None:
    """Write ``facts`` into ``card``: Hub metadata, the ``qalora`` block and the section; keeps everything else."""
    data = card.data
    data.library_name = _LIBRARY[facts.kind]
    data.tags = sorted({*(data.tags or []), *TAGS, *_KIND_TAGS[facts.kind], *tags})
    if facts.base_model and not data.base_model:
        data.base_model = facts.base_model
    if facts.kind != "adapter" and facts.base_model and facts.adapters and not data.get("base_model_relation"):
        data["base_model_relation"] = "finetune"
    if facts.pipeline_tag and not data.pipeline_tag:
        data.pipeline_tag = facts.pipeline_tag
    for key, value in facts.inherited.items():
        if not data.get(key):
            data[key] = value
    data[METADATA_KEY] = facts.metadata()
    card.text = _with_section(card.text, _section(facts, repo_id))


def write_card(folder: Union[str, os.PathLike], facts: CardFacts, repo_id: Optional[str] = None, tags=()) -> ModelCard:
    """Create or update ``folder/README.md`` from ``facts`` (see :func:`write_model_card`)."""
    path = os.path.join(folder, CARD_NAME)
    if os.path.isfile(path):
        card = ModelCard.load(path, ignore_metadata_errors=True)
    else:
        card = ModelCard(f"---\n{ModelCardData().to_yaml()}\n---\n\n# {_title(facts)}\n")
    update_card(card, facts, repo_id=repo_id, tags=tags)
    card.save(path)
    return card


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_model_card(
    folder: Union[str, os.PathLike],
    *,
    kind: str,
    base_dir: Optional[Union[str, os.PathLike]] = None,
    adapter_dir: Optional[Union[str, os.PathLike]] = None,
    base_model: Optional[str] = None,
    quantization: Optional[dict] = None,
    zero_format: Optional[str] = None,
    merge_report: Any = None,
    export: Optional[dict] = None,
    repo_id: Optional[str] = None,
    tags: Iterable[str] = (),
) -> ModelCard:
    """Write (or update) the model card ``folder/README.md`` of a QA-LoRA output.

    Facts come from the folders given and can be overridden one by one; a ``README.md`` already in ``folder`` is
    updated, not replaced. Example, for an exporter::

        write_model_card(out_dir, kind="mlx", base_dir=gptq_dir, adapter_dir=adapter_dir,
                         export={"format": "MLX affine", "bits": 4, "group_size": 32})

    Args:
        folder: The output folder (it must exist).
        kind: ``"adapter"``, ``"merged"``, ``"gguf"`` or ``"mlx"``.
        base_dir: The GPTQ checkpoint folder: its ``config.json`` gives the quantization and the architecture, its
            ``README.md`` the license and language.
        adapter_dir: The QA-LoRA adapter folder: its ``adapter_config.json`` gives rank, targets, the base model id
            and the quantization the adapter was trained on.
        base_model: Hub id of the base model (default: the adapter's ``base_model_name_or_path``, else
            ``base_dir``'s config ``_name_or_path``, else ``base_dir`` itself, as PEFT records a local base).
        quantization: The base's GPTQ settings (default: the adapter's record, else ``base_dir``'s config).
        zero_format: For merged outputs, ``"float"`` or ``"int"`` (default for ``"gguf"``/``"mlx"`` with an
            adapter: ``"float"``, since their offsets are real numbers).
        merge_report: The :class:`~peft_qalora.MergeReport` of an integer merge.
        export: Format facts shown as given, e.g. ``{"format": "Q4_1", "file": "model-Q4_1.gguf"}``.
        repo_id: The Hub repository the folder is pushed to, used in the card's code snippets.
        tags: Extra Hub tags.

    Returns:
        The ``huggingface_hub.ModelCard`` written.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    adapter = _read_json(os.path.join(adapter_dir, CONFIG_NAME)) if adapter_dir is not None else None
    if adapter_dir is not None and adapter is None:
        raise ValueError(f"{adapter_dir} has no {CONFIG_NAME}: it is not a saved adapter.")
    if adapter is not None and adapter.get("peft_type") != QALORA.value:
        raise ValueError(f"{adapter_dir} holds a {adapter.get('peft_type')} adapter, not a QALORA one.")
    config = _read_json(os.path.join(base_dir, "config.json")) if base_dir is not None else None
    if base_dir is not None and config is None:
        raise ValueError(f"{base_dir} has no config.json: it is not a transformers model folder.")
    config = config or {}
    base_quantization = dict(config.get("quantization_config") or {})
    if base_quantization:
        base_quantization.setdefault(
            "checkpoint_format", base_quantization.get("format") or ("gptq" if "bits" in base_quantization else None)
        )
        base_quantization = {key: base_quantization[key] for key in _QUANTIZATION_LABELS if key in base_quantization}
    base_model = (
        base_model
        or (adapter or {}).get("base_model_name_or_path")
        or config.get("_name_or_path")
        or (os.fspath(base_dir) if base_dir is not None else None)
    )
    quantization = quantization or (adapter or {}).get("base_quantization") or base_quantization or None
    if zero_format is None and kind in ("gguf", "mlx") and adapter is not None:
        zero_format = "float"
    merge = None
    if zero_format is not None:
        merge = merge_summary(zero_format, merge_report)
        if kind in ("gguf", "mlx"):
            merge.update(quant_method=kind, format=(export or {}).get("format", kind))
    inherited = base_card_metadata(os.fspath(base_dir)) if base_dir is not None else base_card_metadata(base_model)
    facts = CardFacts(
        kind=kind,
        base_model=base_model,
        quantization=quantization,
        adapters={"default": adapter_summary(adapter)} if adapter is not None else {},
        merge=merge,
        export=export,
        pipeline_tag=pipeline_tag_for(model_architecture(config)),
        inherited=inherited,
    )
    return write_card(folder, facts, repo_id=repo_id, tags=tags)


# ------------------------------------------------------------------------------------------------ the Hub


def facts_from_card(card: ModelCard) -> Optional[CardFacts]:
    """The facts a QA-LoRA card was written from (its ``qalora`` metadata block), or ``None`` for another card."""
    block = card.data.get(METADATA_KEY)
    if not isinstance(block, dict) or block.get("kind") not in KINDS:
        return None
    return CardFacts(
        kind=block["kind"],
        base_model=card.data.base_model if isinstance(card.data.base_model, str) else None,
        quantization=block.get("quantization"),
        adapters=block.get("adapters") or {},
        merge=block.get("merge"),
        export=block.get("export"),
        pipeline_tag=card.data.pipeline_tag,
    )


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


# ------------------------------------------------------------------------------------------------ PEFT models


def qalora_configs(peft_model: Any) -> dict:
    """``{adapter name: QALoraConfig}`` of the QALORA adapters of a PEFT model (empty for any other model)."""
    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, dict):
        return {}
    return {name: config for name, config in configs.items() if getattr(config, "peft_type", None) == QALORA}


def adapter_facts(peft_model: Any) -> CardFacts:
    """Card facts of a PEFT model holding QALORA adapters."""
    configs = qalora_configs(peft_model)
    first = configs.get("default") or next(iter(configs.values()))
    base = peft_model.get_base_model()
    base_model = first.base_model_name_or_path or getattr(base, "name_or_path", None) or None
    architecture = type(base).__name__
    return CardFacts(
        kind="adapter",
        base_model=base_model,
        quantization=first.base_quantization,
        adapters={name: adapter_summary(config) for name, config in configs.items()},
        pipeline_tag=pipeline_tag_for(architecture),
        inherited=base_card_metadata(base_model),
    )


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
    commit_description: Optional[str] = None,
    private: Optional[bool] = None,
    token: Optional[Union[str, bool]] = None,
    revision: Optional[str] = None,
    create_pr: bool = False,
    max_shard_size: Optional[Union[int, str]] = "50GB",
    tags: Optional[list[str]] = None,
):
    """``push_to_hub`` of a model whose ``save_pretrained`` writes the QA-LoRA card (transformers' arguments)."""
    return push_saved(
        lambda folder: model.save_pretrained(folder, max_shard_size=max_shard_size),
        repo_id,
        commit_message=commit_message or default_message,
        commit_description=commit_description,
        private=private,
        token=token,
        revision=revision,
        create_pr=create_pr,
        tags=tags,
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
