"""The data row of the bench measures what it says, on a shape small enough for CI."""

from __future__ import annotations

import torch

from fedpeft_hpc.bench.data_path import shape_row, write_image_folder


def test_shape_row_on_an_image_folder(tmp_path):
    folder = write_image_folder(tmp_path / "f", 40, 8, 4, 20)
    assert len(list((folder / "train").rglob("*.png"))) == 40 and len(list((folder / "test").rglob("*.png"))) == 8
    (tmp_path / "w").mkdir()
    row = shape_row(["model.name=vit_tiny_patch16_224", "model.img_size=16", "model.num_classes=4",
                     "model.kwargs={patch_size: 4, depth: 1, embed_dim: 32, num_heads: 2}", "peft.method=bias",
                     "data.name=imagefolder", f"data.root={folder}", f"data.cache_dir={tmp_path / 'c'}",
                     "data.batch_size=8", "data.augment=crop_flip"], tmp_path / "w", torch.device("cpu"),
                    epochs=2, repeats=2)
    assert row["images"] == 80 and row["augment"] == "crop_flip" and row["repeats"] == 2
    for key in ("data_images_per_s", "model_images_per_s", "round_images_per_s"):
        assert row[key] > 0, key
    # the data path alone is part of a round: its images/s cannot be below the round's by much
    assert row["data_images_per_s"] > row["round_images_per_s"]
    assert 0.0 <= row["data_share"] < 1.0 and 0.0 < row["data_alone_share"] < 1.0
    assert len(list((tmp_path / "c").glob("*.npy"))) == 2  # the bench's folder went through the cache
