# Copyright 2026 The peft-qalora authors. Licensed under the Apache License, Version 2.0.
"""Model cards: the ``README.md`` beside adapters, merged checkpoints and exports.

Every card carries Hub metadata (``library_name``, ``base_model``, ``tags``, ``pipeline_tag``), a ``qalora`` metadata
block (the base's GPTQ quantization, the adapter's rank and targets, and for merged outputs the zero format and the
merge report) and a section, between two HTML comments, that says how to load the files. Loading an adapter or a
float-zero merge needs ``pip install peft-qalora`` and ``import peft_qalora``; PEFT alone fails with
``KeyError: 'QALORA'``, so the card says so.

Cards are written with ``huggingface_hub.ModelCard`` / ``ModelCardData``. Writing into a folder that already has a
``README.md`` updates it: the metadata is merged and only the section between the comments is replaced. What a card
says is gathered in ``card_facts.py``; uploads are in ``hub_upload.py``; how ``save_pretrained`` and ``push_to_hub``
come to write the card, in ``save_hooks.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from typing import Any, Optional, Union

from huggingface_hub import ModelCard, ModelCardData
from peft.utils import CONFIG_NAME

from .card_facts import (
    CARD_NAME,
    KINDS,
    METADATA_KEY,
    CardFacts,
    adapter_summary,
    base_card_metadata,
    merge_summary,
    pipeline_tag_for,
)
from .checkpoint import model_architecture
from .config import QUANTIZATION_KEYS
from .peft_type import QALORA

TAGS = ("qalora", "gptq")
PAPER = "https://arxiv.org/abs/2309.14717"
PROJECT = "https://github.com/peft-qalora/peft-qalora"
SECTION_BEGIN = "<!-- peft-qalora: begin (generated; edits between these comments are replaced on the next save) -->"
SECTION_END = "<!-- peft-qalora: end -->"

_LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "mlx": "mlx"}
_KIND_TAGS = {"adapter": (), "merged": ("merged",), "gguf": ("gguf",), "mlx": ("mlx",)}
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
        base_quantization = {key: base_quantization[key] for key in QUANTIZATION_KEYS if key in base_quantization}
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
