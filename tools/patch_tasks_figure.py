"""Draw the skimage_photos / skimage_science tasks: each source image (one class) with its held-out
test blocks shaded, and a few of its training and test patches.

    python tools/patch_tasks_figure.py docs/results/domain_gap/patch_tasks.png

Needs scikit-image and matplotlib (pip install -e ".[images,plots]").
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from fedpeft_hpc.data.patches import TASKS, block_edges, cut_patches, held_out_blocks, patch_layout, source_image

SHOWN = 4  # patches of each split shown per class


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: patch_tasks_figure.py OUT.png", file=sys.stderr)
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    classes = max(len(v) for v in TASKS.values())
    fig, axes = plt.subplots(2 * len(TASKS), classes, figsize=(2 * classes, 4.4 * len(TASKS)))
    for t, (task, names) in enumerate(TASKS.items()):
        lay = patch_layout(task, SHOWN, SHOWN)
        tiles = {s: cut_patches(task, lay[s]) for s in ("train", "test")}
        for k, name in enumerate(names):
            img = source_image(name)
            ax = axes[2 * t, k]
            ax.imshow(img)
            ye, xe = block_edges(img.shape[0]), block_edges(img.shape[1])
            for r, c in held_out_blocks(k):
                ax.add_patch(Rectangle((xe[c], ye[r]), xe[c + 1] - xe[c], ye[r + 1] - ye[r], color="red", alpha=0.35))
            ax.set_title(f"{task}\n{k}: {name}" if k == 0 else f"{k}: {name}", fontsize=8)
            ax.axis("off")
            row = [np.concatenate([tiles[s][(lay[s].classes == k)][i].transpose(1, 2, 0) for i in range(SHOWN)],
                                  axis=1) for s in ("train", "test")]
            sep = np.full((4, row[0].shape[1], 3), 255, dtype=np.uint8)
            ax = axes[2 * t + 1, k]
            ax.imshow(np.concatenate([row[0], sep, row[1]], axis=0))
            ax.set_title("train (top) / test patches", fontsize=7)
            ax.axis("off")
    fig.suptitle("Source images (one class each); red: the held-out test blocks, where only test patches are cut",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(argv[0], dpi=64)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
