"""Forward time of a merged QA-LoRA layer against the GPTQ layer it came from, at Llama-2-7B layer shapes.

For each shape and number of rows (1 = decoding a token, 512 = a prefill), it times, side by side in one run:

- ``base``: GPTQModel's ``TorchLinear`` (the kernel that trains correctly on CPU), integer zeros;
- ``base + adapter``: the same layer wrapped by a QA-LoRA adapter (r=16), unmerged;
- ``merged``: ``FloatZeroGPTQLinear`` with the adapter folded into real-valued zeros.

Variants are interleaved round-robin and the table reports medians and the ratio to ``base``. Target: merged no
slower than the base layer alone.

    TORCHDYNAMO_DISABLE=1 python benchmarks/merged_layer.py            # CPU, fp32
    python benchmarks/merged_layer.py --rows 1 16 --repeats 20
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402
from gptqmodel.nn_modules.qlinear.torch import TorchLinear  # noqa: E402

from peft_qalora import FloatZeroGPTQLinear, QALoraLinear  # noqa: E402
from peft_qalora.gptq import pack_qweight, pack_qzeros  # noqa: E402
from peft_qalora.merge import fold, read_zero_points  # noqa: E402

logger = logging.getLogger("merged_layer")
LLAMA_7B_SHAPES = {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def gptq_layer(
    in_features: int, out_features: int, bits: int, group_size: int, generator: torch.Generator
) -> TorchLinear:
    """A GPTQModel TorchLinear with random codes, zeros and scales (v2 zeros, as GPTQModel holds them)."""
    layer = TorchLinear(
        bits=bits, group_size=group_size, sym=False, desc_act=False, in_features=in_features, out_features=out_features
    )
    groups = in_features // group_size
    maxq = (1 << bits) - 1
    layer.qweight = pack_qweight(torch.randint(0, maxq + 1, (in_features, out_features), generator=generator), bits)
    layer.qzeros = pack_qzeros(torch.randint(1, maxq, (groups, out_features), generator=generator), bits, "gptq_v2")
    layer.scales = (torch.rand(groups, out_features, generator=generator) * 0.01 + 0.001).half()
    layer.post_init()
    return layer.eval()


def median_seconds(fn, x: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)

    rows_out = []
    for shape_name, (in_features, out_features) in LLAMA_7B_SHAPES.items():
        base = gptq_layer(in_features, out_features, args.bits, args.group_size, generator)
        adapted = QALoraLinear(
            gptq_layer(in_features, out_features, args.bits, args.group_size, generator),
            "default",
            r=args.r,
            lora_alpha=args.r,
            init_lora_weights=False,
        ).eval()
        adapted.base_layer.load_state_dict(base.state_dict())
        zeros = fold(read_zero_points(base, "gptq_v2"), base.scales, adapted.group_delta("default"))
        merged = FloatZeroGPTQLinear.from_gptq(base, zeros)
        variants = {"base": base, "base + adapter": adapted, "merged": merged}
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            with torch.no_grad():
                reference = adapted(x)
                error = (merged(x) - reference).abs().max().item() / reference.abs().max().item()
            times = {name: [] for name in variants}
            for name, module in variants.items():  # warm-up (and int4 repacking for the merged layer)
                median_seconds(module, x)
            for _ in range(args.repeats):
                for name, module in variants.items():
                    times[name].append(median_seconds(module, x))
            medians = {name: statistics.median(values) for name, values in times.items()}
            logger.info("%s rows=%d: %s", shape_name, rows, {k: f"{v * 1e3:.2f} ms" for k, v in medians.items()})
            rows_out.append((shape_name, rows, medians, error))

    print(
        f"\nCPU fp32, torch {torch.__version__}, {os.cpu_count()} cores ({platform.machine()}); "
        f"{args.bits}-bit g{args.group_size}, r={args.r}; medians of {args.repeats} interleaved runs"
    )
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}\n")
    print("| layer (in x out) | rows | base ms | base + adapter ms | merged ms | merged / base | merged rel. error |")
    print("|---|---|---|---|---|---|---|")
    for shape_name, rows, medians, error in rows_out:
        shape = LLAMA_7B_SHAPES[shape_name]
        print(
            f"| {shape_name} ({shape[0]} x {shape[1]}) | {rows} | {medians['base'] * 1e3:.1f} | "
            f"{medians['base + adapter'] * 1e3:.1f} | {medians['merged'] * 1e3:.1f} | "
            f"{medians['merged'] / medians['base']:.2f} | {error:.1e} |"
        )


if __name__ == "__main__":
    main()
