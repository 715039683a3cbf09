"""Which way to batch clients: the measurement behind ``federated.batched``'s choice.

Times one forward/backward of K clients' BitFit parameters at client batch B, four ways:

- ``sequential``: K forward/backward passes at batch B (what the engine did before);
- ``vmap``: ``torch.func.functional_call`` + ``vmap`` over stacked [K, ...] biases, the frozen
  backbone unbatched (the chosen way), with timm's fused attention and with its plain path;
- ``index``: one batch of K*B samples through modules whose bias is ``stacked[client_id]``
  per sample (the other candidate: needs a batched twin of every module with a trainable tensor);
- ``centralized``: one forward/backward at batch K*B (the bound), with timm's fused attention
  and with its plain path (the one vmap uses).

Repeats are interleaved and the fastest kept, so load from other processes hits all alike.
Usage: ``python tools/client_batching_ab.py [--clients 8,32] [--batch 16] [--device cpu|cuda]
[--model quickstart|vit_tiny|vit_base]``.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

MODELS = {
    "quickstart": [],
    "vit_tiny": ["model.img_size=32", "model.kwargs={patch_size: 4}"],
    "vit_base": ["model.name=vit_base_patch16_224", "model.img_size=224", "model.kwargs={}", "model.num_classes=100"],
}


def indexed_copy(model: nn.Module, stacked: dict, state: dict) -> nn.Module:
    """A copy of ``model`` whose trainable biases are read per sample as ``stacked[name][state['cid']]``."""
    twin = copy.deepcopy(model)

    def patch(mod: nn.Module, key: str):
        weight = mod.weight

        def bias_of(x):
            b = stacked[key][state["cid"]]
            return b.view(b.shape[0], *([1] * (x.dim() - 2)), b.shape[1]) if not isinstance(mod, nn.Conv2d) \
                else b.view(b.shape[0], -1, 1, 1)

        if isinstance(mod, nn.Linear):
            return lambda x: F.linear(x, weight) + bias_of(x)
        if isinstance(mod, nn.LayerNorm):
            return lambda x: F.layer_norm(x, mod.normalized_shape, weight, None, mod.eps) + bias_of(x)
        if isinstance(mod, nn.Conv2d):
            return lambda x: mod._conv_forward(x, weight, None) + bias_of(x)
        raise TypeError(type(mod))

    for name, mod in twin.named_modules():
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.Tensor) and b.requires_grad:
            mod.forward = patch(mod, f"{name}.bias")
    return twin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", default="8,32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from fedpeft_hpc.config import load_config
    from fedpeft_hpc.models import build_model
    from fedpeft_hpc.peft import peft_params
    from fedpeft_hpc.quickstart import embedded_config

    dev = torch.device(args.device)
    cfg = load_config(embedded_config(), ["model.pretrained=false", "peft.method=bias", *MODELS[args.model]])
    model, spec = build_model(cfg.model, cfg.peft, 0, load_weights=False)
    model.to(dev).train()
    params = peft_params(model)
    attn = [m for m in model.modules() if hasattr(m, "fused_attn")]
    print(f"{args.model}: {sum(p.numel() for p in model.parameters()):,} params, {args.device}, "
          f"threads {torch.get_num_threads()}")
    for k in [int(c) for c in args.clients.split(",")]:
        b, img = args.batch, spec.img_size
        x = torch.randn(k, b, spec.in_chans, img, img, device=dev)
        y = torch.randint(0, 10, (k, b), device=dev)
        stacked = {n: p.detach().unsqueeze(0).repeat(k, *[1] * p.dim()).requires_grad_() for n, p in params.items()}
        state = {"cid": torch.arange(k, device=dev).repeat_interleave(b)}
        twin = indexed_copy(model, stacked, state)
        biases = [t for n, t in stacked.items() if n.endswith(".bias")]

        def client_loss(p, xk, yk):
            return F.cross_entropy(functional_call(model, p, (xk,)), yk)

        def vmapped(fused: bool):
            for m in attn:
                m.fused_attn = fused
            try:
                torch.autograd.grad(vmap(client_loss)(stacked, x, y).sum(), list(stacked.values()))
            finally:
                for m in attn:
                    m.fused_attn = True

        def indexed():
            out = twin(x.reshape(k * b, *x.shape[2:]))
            loss = F.cross_entropy(out, y.reshape(-1), reduction="sum") / b
            torch.autograd.grad(loss, biases)

        def sequential():
            for i in range(k):
                torch.autograd.grad(F.cross_entropy(model(x[i]), y[i]), list(params.values()))

        def centralized(fused: bool = True):
            for m in attn:
                m.fused_attn = fused
            try:
                torch.autograd.grad(F.cross_entropy(model(x.reshape(k * b, *x.shape[2:])), y.reshape(-1)),
                                    list(params.values()))
            finally:
                for m in attn:
                    m.fused_attn = True

        fns = {"sequential": sequential, "vmap (fused attn)": lambda: vmapped(True),
               "vmap (plain attn)": lambda: vmapped(False), "index": indexed, "centralized": centralized,
               "centralized (plain attn)": lambda: centralized(False)}
        best = {n: float("inf") for n in fns}
        for rep in range(args.repeats + 1):
            for n, fn in fns.items():
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if rep:
                    best[n] = min(best[n], time.perf_counter() - t0)
        base = best["sequential"]
        print(f"K={k} B={b}: " + ", ".join(f"{n} {t * 1e3:.1f} ms ({base / t:.2f}x)" for n, t in best.items()))


if __name__ == "__main__":
    main()
