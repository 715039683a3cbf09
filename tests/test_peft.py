import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from fedpeft_hpc.config import PeftConfig
from fedpeft_hpc.peft import apply_peft, count_params, frozen_params, peft_params, registered_methods
from fedpeft_hpc.peft.prompt import PromptTokens

METHODS = ["full", "head", "bias", "adapter", "prompt", "lora"]


def tiny_vit(num_classes=10):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=num_classes)


def test_registry_has_the_six_methods():
    assert set(METHODS) <= set(registered_methods())


@pytest.mark.parametrize("method, trainable", [("full", 85_875_556), ("head", 76_900), ("bias", 179_812),
                                               ("prompt", 169_060), ("adapter", 224_356)])
def test_vit_b16_counts_match_the_paper(method, trainable):
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    apply_peft(model, PeftConfig(method=method))
    counts = count_params(model)
    assert counts["trainable_params"] == trainable
    assert counts["bytes_per_transfer"] == 4 * trainable  # fp32
    if method in ("full", "head", "bias"):
        assert counts["total_params"] == 85_875_556


@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_tensor_learns(method):
    """After one optimizer step every trainable tensor gets a non-zero gradient (the original
    FedPEFT adapter, zero-initialised on both sides, failed this)."""
    model = apply_peft(tiny_vit(), PeftConfig(method=method, prompt_tokens=3, lora_rank=2, adapter_dim=4))
    params = peft_params(model)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in frozen_params(model).items():
        assert p.grad is None, name


@pytest.mark.parametrize("method", ["adapter", "lora"])
def test_zero_init_methods_start_as_the_backbone(method):
    base = tiny_vit()
    x = torch.randn(4, 3, 16, 16)
    ref = base(x)
    model = apply_peft(copy.deepcopy(base), PeftConfig(method=method, adapter_dim=4, lora_rank=2))
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_adapters_are_per_block_and_randomly_initialised():
    model = apply_peft(tiny_vit(), PeftConfig(method="adapter", adapter_dim=4))
    downs = [b.mlp.adapter.down.weight for b in model.blocks]
    assert len(downs) == 2 and downs[0] is not downs[1]
    assert all(d.abs().sum() > 0 for d in downs)
    assert all(b.mlp.adapter.up.weight.abs().sum() == 0 for b in model.blocks)


@pytest.mark.parametrize("deep, expected", [(True, 2), (False, 1)])
def test_prompt_deep_and_shallow(deep, expected):
    model = apply_peft(tiny_vit(), PeftConfig(method="prompt", prompt_tokens=3, prompt_deep=deep))
    prompts = [m for m in model.modules() if isinstance(m, PromptTokens)]
    assert len(prompts) == expected
    assert all(p.tokens.shape == (3, 32) for p in prompts)
    # prompts live in submodules, never on the root (Opacus would fall back to functorch)
    assert not any(p.requires_grad for p in model._parameters.values() if p is not None)
    feats = model.forward_features(torch.randn(2, 3, 16, 16))
    assert feats.shape[1] == 1 + 16  # prompt outputs stripped after the last block
    before = model(torch.ones(1, 3, 16, 16))
    with torch.no_grad():
        prompts[-1].tokens.add_(torch.randn_like(prompts[-1].tokens))
    assert not torch.allclose(model(torch.ones(1, 3, 16, 16)), before)


def test_lora_targets_and_merge():
    model = apply_peft(tiny_vit(), PeftConfig(method="lora", lora_rank=2, lora_alpha=4.0,
                                              lora_targets=["qkv", "proj", "fc1", "fc2"]))
    names = list(peft_params(model))
    for target in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
        assert any(f"{target}.lora_A.weight" in n for n in names), target
    layer = model.blocks[0].attn.qkv
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(5, 32)
    merged = x @ layer.merged_weight().T + layer.base.bias
    assert torch.allclose(layer(x), merged, atol=1e-5)
    assert layer.scaling == 2.0


def test_state_order_is_fixed():
    a = list(peft_params(apply_peft(tiny_vit(), PeftConfig(method="bias"))))
    b = list(peft_params(apply_peft(tiny_vit(), PeftConfig(method="bias"))))
    assert a == b == sorted(a)


def test_the_cuda_layer_norm_fix_is_the_same_function_with_a_bias_gradient():
    """``split_layer_norm_bias`` (for a CUDA backward bug) is applied on CUDA only and computes the
    same outputs and gradients as the fused LayerNorm."""
    import timm

    from fedpeft_hpc.models import device_fixes

    def model():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2)
        apply_peft(m, PeftConfig(method="bias"))
        return m

    fused, split = model(), model()
    assert device_fixes.apply_device_fixes(split, torch.device("cpu")) == []  # CPU: untouched
    changed = device_fixes.split_layer_norm_bias(split)
    assert "norm" in changed and len(changed) == 5  # 2 blocks x 2 norms + the final norm
    x = torch.randn(4, 3, 16, 16)
    out_f, out_s = fused(x), split(x)
    torch.testing.assert_close(out_s, out_f, atol=1e-5, rtol=1e-5)
    out_f.square().sum().backward()
    out_s.square().sum().backward()
    pf, ps = peft_params(fused), peft_params(split)
    for k in pf:
        assert ps[k].grad is not None
        torch.testing.assert_close(ps[k].grad, pf[k].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_the_cuda_layer_norm_fix_pickles_and_keeps_opacus_per_sample_gradients(tmp_path):
    """The split LayerNorm is a class of its own (a subclass of the original): a patched model survives
    torch.save/torch.load, keeps its parameters, state_dict keys and isinstance checks, and Opacus computes the
    same per-sample gradients for it as for the unpatched model (its rule is looked up by exact type)."""
    import timm
    from opacus import GradSampleModule
    from timm.layers import LayerNorm as TimmLayerNorm
    from torch import nn

    from fedpeft_hpc.models import device_fixes

    def vit():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                              depth=2, embed_dim=32, num_heads=2)
        return apply_peft(m, PeftConfig(method="bias"))

    def mlp():  # torch's own LayerNorm, which Opacus has a hook rule for
        torch.manual_seed(0)
        m = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 24), nn.LayerNorm(24), nn.Linear(24, 10))
        m[2].weight.requires_grad_(False)
        return m

    x, y = torch.randn(5, 3, 16, 16), torch.tensor([0, 3, 1, 9, 3])
    for build, cls in ((vit, TimmLayerNorm), (mlp, nn.LayerNorm)):
        plain, split = build(), build()
        changed = device_fixes.split_layer_norm_bias(split)
        assert changed
        norm = split.get_submodule(changed[0])
        assert isinstance(norm, cls) and type(norm) is device_fixes.SPLIT_CLASSES[cls]
        assert list(split.state_dict()) == list(plain.state_dict())
        assert sum(p.numel() for p in split.parameters()) == sum(p.numel() for p in plain.parameters())
        torch.save(split, tmp_path / "m.pt")
        loaded = torch.load(tmp_path / "m.pt", weights_only=False)
        assert type(loaded.get_submodule(changed[0])) is type(norm)
        assert torch.equal(loaded(x), split(x))
        if cls is nn.LayerNorm:
            assert GradSampleModule.GRAD_SAMPLERS[type(norm)] is GradSampleModule.GRAD_SAMPLERS[nn.LayerNorm]
        samples = []
        for m in (plain, split):
            gsm = GradSampleModule(m)
            nn.functional.cross_entropy(gsm(x), y).backward()
            samples.append({n: p.grad_sample for n, p in m.named_parameters() if p.requires_grad})
            gsm._close()
        assert samples[0].keys() == samples[1].keys() and any("norm" in n or n.startswith("2.") for n in samples[0])
        for n in samples[0]:
            assert samples[1][n].shape[0] == len(y), n
            torch.testing.assert_close(samples[1][n], samples[0][n], atol=1e-5, rtol=1e-4)
