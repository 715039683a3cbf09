"""Throughput of the frozen-backbone step on this device, for planning client batching.

Prints images/s of forward+backward for a timm model with only biases + head trainable
(BitFit), at several batch sizes, fp32 and bf16 autocast. Run on a lent GPU:
``python tools/gpu_probe.py --model vit_base_patch16_224 --img 224``.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--batches", default="16,64,256,512")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    import timm

    dev = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=100, img_size=args.img).to(dev)
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("bias") or n.startswith("head"))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    for dtype in (torch.float32, torch.bfloat16):
        for b in [int(x) for x in args.batches.split(",")]:
            x = torch.randn(b, 3, args.img, args.img, device=dev)
            y = torch.randint(0, 100, (b,), device=dev)

            def step():
                with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                    loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            for _ in range(3):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.iters):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / args.iters
            mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
            print(f"{args.model} {args.img}px {str(dtype):>14} batch {b:4d}: {b / dt:9.1f} img/s "
                  f"({dt * 1e3:7.1f} ms/step, peak {mem:.1f} GiB)", flush=True)


if __name__ == "__main__":
    main()
