"""Typed configuration: one dataclass per section.

YAML holds values only; every value is coerced to the type declared here and checked
against the ``choices``/bounds in the field metadata (see ``config.load``). Cross-field
rules (e.g. clients per round <= clients) live in ``validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


def opt(default: Any, help: str = "", choices: tuple | None = None, min: float | None = None,
        max: float | None = None, min_exclusive: bool = False, factory: Any = None,
        item_choices: tuple | None = None, max_exclusive: bool = False, allow_empty: bool = False) -> Any:
    """A dataclass field with the metadata that validation and ``fedpeft-hpc config keys`` read:
    help text, allowed values (``choices``, or ``item_choices`` for each element of a list, which must be
    non-empty unless ``allow_empty``) and bounds."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "item_choices": item_choices, "allow_empty": allow_empty}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# names of the parts of a PEFT state (``peft.local``, ``peft.frozen``); which a method has: peft/parts.py
CODEC_CHOICES = ("none", "fp16", "bf16", "int8", "int4", "topk")
PEFT_PARTS = ("head", "lora_a", "lora_b", "adapter", "prompt", "bias")


@dataclass
class RunConfig:
    dir: str = opt("runs/default", "where everything of this run is written")
    resume: str = opt("auto", "auto: continue the run in run.dir from checkpoints/latest.safetensors (from round 0 "
                      "if it wrote metrics but no checkpoint yet); "
                      "never: refuse a directory that already holds a run; must: fail without a checkpoint",
                      choices=("auto", "never", "must"))
    checkpoint_every: int = opt(1, "write the global PEFT state every N rounds (and always at the end)", min=1)
    keep_checkpoints: int = opt(2, "how many round checkpoints to keep besides latest (0: only latest)", min=0)
    threads: int = opt(0, "CPU threads per process (0: cores / processes on this node)", min=0)
    progress: bool = opt(True, "show a progress bar on rank 0 (only when its stderr is a terminal)")
    tensorboard: bool = opt(False, "also write every round's metrics as TensorBoard scalars to run.dir/tensorboard "
                                   "(needs the tensorboard package)")
    log_level: str = opt("info", "logging level", choices=("debug", "info", "warning", "error"))
    compile: bool = opt(False, "client-batched training (fed.client_batch) pads every step to all K slots and the "
                               "full data.batch_size and runs its forward/backward through torch.compile (the "
                               "eager path, with a log line, where it cannot: head-only training, DP-SGD, a "
                               "backend that fails)")


@dataclass
class ModelConfig:
    name: str = opt("vit_base_patch16_224", "a timm model name")
    num_classes: int = opt(100, "classes of the new head", min=1)
    pretrained: bool = opt(False, "load pre-trained weights (from model.checkpoint, else timm's own source)")
    checkpoint: Optional[str] = opt(None, "local weights file (.safetensors, .pth, .npz) for offline nodes "
                                          "(~ and $VARS are expanded)")
    pretrain_recipe: Optional[str] = opt(
        None, "build model.checkpoint with a built-in pre-training recipe when it does not exist yet",
        choices=(None, "digits"))
    img_size: Optional[int] = opt(None, "input resolution (default: the model's own)", min=1)
    precision: str = opt("fp32", "arithmetic of the forward/backward of client training: fp32, tf32 "
                         "(TensorFloat-32 matmuls and convolutions on CUDA), bf16 (autocast); PEFT state, updates "
                         "and aggregation stay fp32/fp64, evaluation is always fp32", choices=("fp32", "tf32", "bf16"))
    kwargs: dict = opt(None, "extra timm.create_model arguments (patch_size, depth, embed_dim, ...)", factory=dict)


@dataclass
class PeftConfig:
    method: str = opt("bias", "what is trained and exchanged: a registered PEFT method")
    adapter_dim: int = opt(8, "adapter bottleneck width", min=1)
    adapter_bias: bool = opt(False, "adapters carry bias vectors")
    adapter_scale: float = opt(1.0, "adapter output scale")
    prompt_tokens: int = opt(10, "VPT prompt tokens (per layer when deep)", min=1)
    prompt_deep: bool = opt(True, "VPT-deep (new tokens in every block) or shallow (first block only)")
    lora_rank: int = opt(8, "LoRA rank", min=1)
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank)", min=0.0, min_exclusive=True)
    lora_targets: list = opt(None, "layers of every block that get LoRA", factory=lambda: ["qkv", "proj"],
                             item_choices=("qkv", "proj", "fc1", "fc2"))
    local: list[str] = opt(None, "parts of the method's PEFT state each client trains and keeps for itself, never sent "
                      "(FedSA-LoRA: [lora_b]; FedPer: [head]). Parts per method: head: head; bias: bias, head; "
                      "adapter: adapter, head; prompt: prompt, head; lora: lora_a, lora_b, head; full: head",
                      factory=list, item_choices=PEFT_PARTS, allow_empty=True)
    frozen: list[str] = opt(None, "parts fixed at their seeded initialisation, trained and sent by no one "
                       "(FFA-LoRA: [lora_a]); same part names as peft.local, a part may not be in both",
                       factory=list, item_choices=PEFT_PARTS, allow_empty=True)
    lora_ranks: list[int] = opt(None, "heterogeneous LoRA ranks (HetLoRA): clients are assigned to these rank tiers "
                           "in equal shares, drawn from the seed (partition.json); the model holds the largest "
                           "rank (scale lora_alpha / largest), a client trains and exchanges the first r rows of "
                           "A and columns of B, and the server averages them zero-padded. Empty: every client "
                           "has peft.lora_rank", factory=list)


@dataclass
class DataConfig:
    name: str = opt("synthetic", "a registered dataset")
    root: str = opt("data", "where the dataset lives (~ and $VARS are expanded)")
    download: bool = opt(False, "allow torchvision to download cifar10/cifar100 into data.root")
    partition: str = opt("dirichlet", "how training data is split over clients", choices=("iid", "dirichlet"))
    alpha: float = opt(0.1, "Dirichlet concentration (smaller: more non-IID)", min=0.0, min_exclusive=True)
    min_samples: int = opt(10, "each client gets at least this many samples (Dirichlet is redrawn)", min=1)
    partition_file: Optional[str] = opt(None, "reuse a saved partition.json instead of drawing one")
    batch_size: int = opt(64, "local batch size", min=1)
    eval_batch_size: int = opt(256, "test-set batch size", min=1)
    num_workers: int = opt(0, "processes that decode an image folder into its cache the first time (they live "
                           "for that build only; batches never need workers)", min=0)
    cache_dir: str = opt("~/.cache/fedpeft-hpc/images", "where image folders are cached, decoded once as "
                         "memory-mapped uint8 files (shared by all ranks and nodes; rebuilt when the folder changes)")
    cache_img_size: Optional[int] = opt(None, "side in pixels of the images in an image-folder cache (default: "
                                        "the model's input size, so no resize runs per batch)", min=1)
    augment: str = opt("none", "training augmentation, per batch on the device: none, flip (left-right), "
                       "crop_flip (pad 1/8, random crop, flip)", choices=("none", "flip", "crop_flip"))
    gpu_store_mb: float = opt(2048.0, "on a GPU, decoded datasets up to this many MB are copied to the device "
                              "once and batches are gathered there; larger ones send each batch (0: never)",
                              min=0.0)
    max_train_samples: Optional[int] = opt(None, "subsample the training set without replacement", min=1)
    test_fraction: float = opt(0.2, "imagefolder without test/ folder: share held out for testing",
                               min=0.0, max=1.0, min_exclusive=True)
    synthetic_samples: int = opt(2048, "synthetic: training samples", min=1)
    synthetic_test_samples: int = opt(512, "synthetic: test samples", min=1)
    client_test_fraction: float = opt(0.0, "share of each client's samples held out (drawn from the seed, saved "
                                      "in partition.json) to measure personal_acc: each client's own model (global "
                                      "state + its local parts + its LoRA rank) on its own held-out samples",
                                      min=0.0, max=1.0, max_exclusive=True)
    patches_per_class: int = opt(100, "skimage_photos, skimage_science: training patches cut from each source "
                                 "image (class)", min=1)
    test_patches_per_class: int = opt(40, "skimage_photos, skimage_science: test patches per class, cut from "
                                      "regions of the image no training patch touches", min=1)


@dataclass
class FedConfig:
    num_clients: int = opt(64, "clients in the population", min=1)
    clients_per_round: int = opt(8, "clients sampled each round", min=1)
    rounds: int = opt(50, "communication rounds", min=1)
    local_epochs: int = opt(10, "local epochs per round", min=1)
    dropout: float = opt(0.0, "probability that a sampled client does not return its update", min=0.0, max=1.0)
    min_clients: int = opt(1, "rounds where fewer updates arrive keep the global state unchanged (must be 1 "
                              "with privacy.mode=client, which applies every round)", min=1)
    max_update_norm: Optional[float] = opt(None, "reject updates whose L2 norm exceeds this", min=0.0,
                                           min_exclusive=True)
    client_batch: str = opt("auto", "clients a rank trains at once in one forward/backward on the shared backbone: "
                            "auto (K from the device's free memory; the default), a number K, or off (one after "
                            "another); peft.method=full and models with batch norm or active dropout/drop path/patch "
                            "dropout are always trained one after another, as is a rank that gets one client per "
                            "round. Results equal off to fp32 rounding (1e-5), for any world size")
    sampling: str = opt("auto", "how cohorts are drawn: fixed (exactly clients_per_round, without replacement), "
                                "poisson (each client independently with probability clients_per_round / "
                                "num_clients), auto (poisson with privacy.mode=client, else fixed)",
                        choices=("auto", "fixed", "poisson"))
    compress_up: str = opt("none", "encoding of each client's update on the uplink: none (fp32), fp16, bf16, int8 or "
                                   "int4 (per-block scales, stochastic rounding), topk (fed.topk_fraction largest "
                                   "entries with their indices); the server aggregates what it decodes",
                           choices=CODEC_CHOICES)
    compress_down: str = opt("none", "encoding of the global state's difference from the initial PEFT state on the "
                                     "downlink (same encodings); clients train from what they decode",
                             choices=CODEC_CHOICES)
    topk_fraction: float = opt(0.1, "share of entries fed.compress_*=topk sends (at least one)", min=0.0, max=1.0,
                               min_exclusive=True)
    error_feedback: bool = opt(False, "each client adds the residual of its last uplink encoding to its next update "
                                      "(kept per client in run.dir/client_state_residual); needs fed.compress_up")
    compress_block: int = opt(256, "values that share one fp32 scale under int8 / int4", min=1)


@dataclass
class OptimConfig:
    name: str = opt("sgd", "client optimizer", choices=("sgd", "adamw"))
    lr: float = opt(1e-2, "client learning rate", min=0.0, min_exclusive=True)
    momentum: float = opt(0.9, "SGD momentum", min=0.0, max=1.0)
    nesterov: bool = opt(True, "Nesterov momentum (SGD)")
    weight_decay: float = opt(1e-4, "weight decay", min=0.0)
    betas: list = opt(None, "AdamW betas", factory=lambda: [0.9, 0.999])


@dataclass
class ServerConfig:
    optimizer: str = opt("fedavg", "server update rule", choices=("fedavg", "fedavgm", "fedadam"))
    lr: Optional[float] = opt(None, "server learning rate (default: 1.0 for fedavg and fedavgm, 0.01 for fedadam)",
                              min=0.0, min_exclusive=True)
    momentum: float = opt(0.9, "FedAvgM momentum", min=0.0, max=1.0)
    beta1: float = opt(0.9, "FedAdam beta1", min=0.0, max=1.0)
    beta2: float = opt(0.99, "FedAdam beta2", min=0.0, max=1.0)
    eps: float = opt(1e-3, "FedAdam adaptivity tau", min=0.0, min_exclusive=True)


@dataclass
class EvalConfig:
    every: int = opt(1, "evaluate on the global test set every N rounds (and always in the last)", min=1)


@dataclass
class PrivacyConfig:
    mode: str = opt("none", "none, sample (DP-SGD on each client), client (client-level DP)",
                    choices=("none", "sample", "client"))
    noise_multiplier: Optional[float] = opt(None, "Gaussian noise std / clipping norm", min=0.0)
    target_epsilon: Optional[float] = opt(None, "derive the noise so that this epsilon is spent at the end",
                                          min=0.0, min_exclusive=True)
    delta: float = opt(1e-5, "delta of the (epsilon, delta) guarantee", min=0.0, max=1.0, min_exclusive=True,
                       max_exclusive=True)
    max_grad_norm: float = opt(1.0, "clipping norm (per sample, or per client update)", min=0.0,
                               min_exclusive=True)
    accountant: str = opt("rdp", "privacy accountant", choices=("rdp", "prv"))
    seeded_noise: bool = opt(False, "false: DP noise from a secret drawn at start that nothing written can "
                                    "regenerate; true: noise derived from the seed, repeatable, for simulation "
                                    "studies only (the epsilon then holds only against whoever does not know "
                                    "the seed)")
    release: str = opt("covered", "what a DP run writes: covered (metrics.jsonl and summary.json hold only what "
                                  "epsilon covers: the round, test metrics of the noised model, epsilon, and values "
                                  "that follow from the public schedule) or all (also the unnoised training "
                                  "statistics, cohort counts and timings, listed in privacy.json as not covered)",
                       choices=("covered", "all"))


@dataclass
class CommConfig:
    backend: str = opt("auto", "auto (nccl on GPU, gloo on CPU), gloo, nccl, mpi (mpi4py on host buffers)",
                       choices=("auto", "gloo", "nccl", "mpi"))
    timeout_s: float = opt(300.0, "collective timeout; a dead rank ends the job after this", min=1.0)
    device: str = opt("auto", "auto (cuda:LOCAL_RANK when GPUs exist), cpu, cuda", choices=("auto", "cpu", "cuda"))


@dataclass
class Config:
    seed: int = opt(42, "seed of every random stream (derived per round and client)")
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    comm: CommConfig = field(default_factory=CommConfig)
