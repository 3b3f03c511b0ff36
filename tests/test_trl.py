"""TRL's ``SFTTrainer(model, ..., peft_config=QALoraConfig(...))``, the recipe most QLoRA users follow."""

import pytest
import torch
from conftest import load_gptq
from peft import PeftModel
from reference import assert_close
from transformers import AutoTokenizer

from peft_qalora import QALoraConfig, QALoraLinear

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,",
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be on his first entering a neighbourhood,",
    "this truth is so well fixed in the minds of the surrounding families, that he is considered as the rightful",
    "property of some one or other of their daughters.",
]


def lm_loss(model, batch):
    with torch.no_grad():
        return model(**batch, labels=batch["input_ids"]).loss.item()


def test_sft_trainer_trains_saves_and_merges(gptq_checkpoint, tmp_path):
    synthetic = gptq_checkpoint(bits=4, act_order=True, sym=False)
    tokenizer = AutoTokenizer.from_pretrained(synthetic.path)
    tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True, truncation=True, max_length=48)
    model = load_gptq(synthetic.path)  # the default kernel of this machine: QA-LoRA trains on any of them
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=20,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_length=48,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_dict({"text": TEXTS}),
        processing_class=tokenizer,
        peft_config=QALoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    peft_model = trainer.model
    assert isinstance(peft_model, PeftModel) and any(isinstance(m, QALoraLinear) for m in peft_model.modules())
    before = lm_loss(peft_model, batch)
    trainer.train()
    peft_model.eval()
    after = lm_loss(peft_model, batch)
    assert after < before - 0.5, (before, after)

    with torch.no_grad():
        trained = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_gptq(synthetic.path), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert_close(reloaded(**batch).logits, trained, atol=1e-5, what="reloaded adapter")
        merged = reloaded.merge_and_unload()
        assert_close(merged(**batch).logits, trained, atol=1e-4, what="merged")
