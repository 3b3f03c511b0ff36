"""Train a QA-LoRA adapter with transformers.Trainer; run alone or under torchrun (DDP, gloo on CPU).

    python train_qalora.py CHECKPOINT OUT_DIR --batch-size 4
    torchrun --nproc_per_node 2 train_qalora.py CHECKPOINT OUT_DIR --batch-size 2

The dataset is as many fixed sequences of one length as one step's global batch holds, so every step sees all of them
whatever the number of processes, and the loss (a mean over equally many tokens per sequence) is the same function:
the adapters of a 1-process and a 2-process run must agree.
"""

import argparse
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from peft import get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, GPTQConfig, Trainer, TrainingArguments  # noqa: E402

import peft_qalora  # noqa: E402,F401  (registers QALORA)
from peft_qalora import QALoraConfig  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("out_dir")
parser.add_argument("--batch-size", type=int, required=True, help="per process")
parser.add_argument("--global-batch", type=int, default=4)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--optim", default="adamw_torch")
parser.add_argument("--lr", type=float, default=1e-2)
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(
    args.checkpoint, dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend="gptq_torch")
)
torch.manual_seed(0)  # the same adapter initialisation in every process
model = get_peft_model(model, QALoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
sequences = torch.randint(3, 256, (args.global_batch, 24), generator=torch.Generator().manual_seed(1))
training_args = TrainingArguments(
    output_dir=os.path.join(args.out_dir, "trainer"),
    max_steps=args.steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr,
    optim=args.optim,
    save_strategy="no",
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None,  # torchrun sets it
    disable_tqdm=True,
    seed=0,
)
trainer = Trainer(model=model, args=training_args, train_dataset=[{"input_ids": s, "labels": s} for s in sequences])
trainer.train()
if trainer.is_world_process_zero():
    model.save_pretrained(os.path.join(args.out_dir, "adapter"))
    with open(os.path.join(args.out_dir, "world_size"), "w") as f:
        f.write(str(trainer.args.world_size))
