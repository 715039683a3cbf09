import pytest
import torch

from fedpeft_hpc.config import ModelConfig
from fedpeft_hpc.errors import CheckpointError
from fedpeft_hpc.models.backbone import build_backbone, image_spec

KW = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}


def cfg(**kw) -> ModelConfig:
    base = dict(name="vit_tiny_patch16_224", num_classes=10, img_size=16, kwargs=dict(KW))
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_load_and_the_head_is_new(tmp_path, suffix):
    src = build_backbone(cfg(num_classes=7), seed=123)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    model = build_backbone(cfg(pretrained=True, checkpoint=str(path)), seed=0)
    assert torch.equal(model.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert torch.equal(model.pos_embed, src.pos_embed)
    assert model.head.weight.shape == (10, 32)  # a new head for model.num_classes
    again = build_backbone(cfg(pretrained=True, checkpoint=str(path)), seed=0)
    assert torch.equal(model.head.weight, again.head.weight)  # drawn from the seed alone


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    other = build_backbone(cfg(kwargs={**KW, "embed_dim": 48}), seed=0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="does not fit"):
        build_backbone(cfg(pretrained=True, checkpoint=str(path)), seed=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_backbone(cfg(pretrained=True, checkpoint=str(tmp_path / "none.safetensors")), seed=0)


def test_normalisation_comes_from_the_pretrained_config():
    import timm

    spec = image_spec(timm.create_model("vit_base_patch16_224", pretrained=False))
    assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5) and spec.img_size == 224
    assert image_spec(build_backbone(cfg(), seed=0)).img_size == 16
