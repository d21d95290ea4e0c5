"""int4's error: the weights' own, and what it does to a model's logits, min-max groups against fitted clipping.

``graphopt.ops.weight_only_linear.quantize_int4`` pulls each group's range in
by the factor (of ``INT4_CLIP_FACTORS``) that rounds the group with the least
squared error. This measures what that buys, side by side in one process:
each quantizer with the clip factors as shipped (``fitted``) and with only
1.0 (``min-max``: each group's own min and max, what it did before).

Per model (random weights, configs only): the weights' relative error over
every linear, and the logits' relative L2 and top-1 agreement with the int4
weights dequantized into the model (fresh token ids ``(4, 32)``) for: every
linear, the MLP linears only, the LM head only.

    python benchmarks/int4_error.py            # tiny Llama and the 4-layer, hidden-512 Llama of issue 16
    python benchmarks/int4_error.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from graphopt.ops import weight_only_linear as wo  # noqa: E402

MODELS = {
    "tiny llama (2 layers, hidden 64)": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=320),
    "llama (4 layers, hidden 512, vocab 32000)": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=1376,
                                                      num_attention_heads=8, num_key_value_heads=2,
                                                      vocab_size=32000),
}
SUBSETS = {"every linear": lambda name: True, "MLP only": lambda name: ".mlp." in name,
           "LM head only": lambda name: name == "lm_head"}


def dequantized(weight: torch.Tensor, factors: tuple[float, ...]) -> torch.Tensor:
    kept = wo.INT4_CLIP_FACTORS
    wo.INT4_CLIP_FACTORS = factors
    try:
        packed, scales, group = wo.quantize_int4(weight)
    finally:
        wo.INT4_CLIP_FACTORS = kept
    return wo.dequantize_int4(packed, scales, group)


def measure(config: dict, factors: tuple[float, ...]) -> dict:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    int4 = {n: dequantized(m.weight, factors) for n, m in linears.items()}
    own = [float((int4[n] - m.weight.detach()).norm() / m.weight.detach().norm()) for n, m in linears.items()]
    ids = torch.randint(0, config["vocab_size"], (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
    row = {"weights rel error (mean over linears)": sum(own) / len(own)}
    for subset, chosen in SUBSETS.items():
        kept = {n: m.weight.data.clone() for n, m in linears.items() if chosen(n)}
        for n in kept:
            linears[n].weight.data.copy_(int4[n])
        with torch.no_grad():
            logits = model(ids).logits
        for n, w in kept.items():
            linears[n].weight.data.copy_(w)
        rel = float((logits - reference).norm() / reference.norm())
        top1 = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
        row[subset] = {"linears": len(kept), "rel_l2": rel, "top1": top1}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "models": {}}
    for name, config in MODELS.items():
        rows = {"min-max": measure(config, (1.0,)), "fitted": measure(config, wo.INT4_CLIP_FACTORS)}
        results["models"][name] = rows
        print(f"\n{name}")
        print(f"  {'':10} {'weights':>9}  " + "  ".join(f"{s + ' rel_l2 / top1':>28}" for s in SUBSETS))
        for quantizer, row in rows.items():
            cells = "  ".join(f"{row[s]['rel_l2']:>19.4f} / {row[s]['top1']:.3f}" for s in SUBSETS)
            print(f"  {quantizer:10} {row['weights rel error (mean over linears)']:>9.4f}  {cells}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
