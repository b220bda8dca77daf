"""SamS: adaptive batch-wise sample scheduling for DPO (Huang et al., NeurIPS 2025, arXiv 2506.17252).

Each pair of a DPO batch is an arm of a contextual bandit. A scheduler scores the n pairs from the policy's
hidden states (score = f_S + lambda f_S') and keeps k; the policy steps on the kept pairs only. The reward of
round t-1's selection is finished one round late, from the policy's view of batch X_t, so SamS needs no extra
policy forward. The paper is the specification; where the authors' code differs, `SamsSettings` says which
default follows which (docs/sams.md). The reward math is sams_rewards.py, the nets sams_nets.py.

Call order, once per DPO round t on a batch of n pairs (all inputs from one no-grad forward of the batch):

    sched = SamsScheduler(hidden_size=d, num_layers=L, config=SamsSettings(), seed=0)
    features = layer_features(chosen_hidden, rejected_hidden, chosen_mask, rejected_mask)  # (n, L, d)
    keep, metrics = sched.step(features, margins, chosen_logps, k)   # margins = beta * h (n,)
    # ... forward + backward + optimizer step of the policy on batch[keep] ...

`step` = `observe(margins)` (finish round t-1's rewards with M_t, train f_S then f_S' on round t-1's rows plus
replayed batches, push round t-1 into the pool) -> `contexts(features)` -> `select(contexts, k)` ->
`remember(...)` (round t waits for round t+1). The parts are public for loops that need them split.
`state_dict()` / `load_state_dict()` cover nets, optimizers, pool, pending round, reward history and RNG.
`pretrain_step(features, labels)` is the optional SFT-time pretraining of connector + encoder + f_S.

Imports only torch and the standard library.
"""

import copy
from collections import deque
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from unipipe_ray.config.sams import SamsSettings
from unipipe_ray.core.sams_encoder import build_encoder
from unipipe_ray.core.sams_nets import ResidualMLP, connector, downsample, layer_features, private_rng
from unipipe_ray.core.sams_rewards import arm_labels, batch_likelihood, batch_reward, sample_reward

__all__ = [
    "SamsSettings",
    "SamsScheduler",
    "layer_features",
    "batch_likelihood",
    "batch_reward",
    "sample_reward",
    "arm_labels",
]


class SamsScheduler:
    """The SamS scheduler: contexts, scores, selection, lagged update (see the module docstring for the loop).

    encoder: optional module replacing the one `settings.encoder` names (sams_encoder.build_encoder), called as
    encoder(embeds (n, L, C), mask (n, L) bool) -> (n, L, C). device: where the nets run; the pool and the
    pending round stay on CPU.
    """

    def __init__(self, hidden_size, num_layers, config=None, seed=0, encoder=None, device="cpu"):
        s = self.settings = config or SamsSettings()
        self.packaged_encoder = False  # True: the encoder's weights are the package's and never change
        self.num_layers, self.device = num_layers, torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        with private_rng(seed, self.device):
            if encoder is None:
                # a MiniLM built here is frozen unless freeze_encoder is off; its weights then stay the package's
                encoder = build_encoder(s.encoder, num_layers, s.context_size, s.encoder_layers, s.encoder_heads,
                                        s.encoder_ff_width, trainable=not s.freeze_encoder)
                self.packaged_encoder = s.encoder == "minilm" and s.freeze_encoder
            nets = {
                "connector": connector(hidden_size, s.connector_width, s.context_size),
                "encoder": encoder,
                "exploit": ResidualMLP(s.context_size, s.width, s.depth, s.dropout),
            }
            if s.explore:
                nets["explore"] = ResidualMLP(s.depth * s.width // s.explore_downsample, s.width, s.depth, s.dropout)
        self.nets = nn.ModuleDict(nets).to(self.device).eval()
        exploit = list(self.nets["exploit"].parameters()) + self._context_params(in_dpo=True)
        self.exploit_optimizer = self._adam(exploit)
        self.explore_optimizer = self._adam(self.nets["explore"].parameters()) if s.explore else None
        pretrain = list(self.nets["exploit"].parameters()) + self._context_params(in_dpo=False)
        self.pretrain_optimizer = self._adam(pretrain)
        self.pool = deque(maxlen=s.pool_size)  # (contexts (m, C), labels (m,)) of past rounds, CPU
        self.pending = None  # round t-1, waiting for its reward
        self.past_reward_sum, self.past_reward_count = 0.0, 0

    def _adam(self, params):
        return torch.optim.Adam(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def _context_params(self, in_dpo):
        """Trainable connector/encoder parameters: in DPO only the unfrozen ones; in pretraining all that
        require grad (freeze an external encoder by setting requires_grad=False on it)."""
        s, params = self.settings, []
        for name, frozen in (("connector", s.freeze_connector), ("encoder", s.freeze_encoder)):
            if not (in_dpo and frozen):
                params += [p for p in self.nets[name].parameters() if p.requires_grad]
        return params

    @property
    def trains_context_nets(self):
        return not (self.settings.freeze_connector and self.settings.freeze_encoder)

    def _encode(self, features):
        """features (n, L, d) -> contexts (n, C): connector, encoder over the layer sequence, mean pool, L2."""
        if features.shape[1] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers, got {features.shape[1]}")
        embeds = self.nets["connector"](features.to(self.device, torch.float32))
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=self.device)
        return F.normalize(self.nets["encoder"](embeds, mask).mean(1), dim=-1)

    @torch.no_grad()
    def contexts(self, features):
        """Arm contexts (paper: 384-d, unit norm). features (n, L, d) from layer_features -> (n, C)."""
        return self._encode(features)

    @torch.no_grad()
    def scores(self, contexts):
        """score = f_S(x) + lambda * f_S'(downsample(f_S's activations)); f_S alone if explore is off. (n,)."""
        s = self.settings
        exploit, hidden = self.nets["exploit"](contexts.to(self.device))
        if not s.explore:
            return exploit
        return exploit + s.explore_weight * self.nets["explore"](downsample(hidden, s.explore_downsample))[0]

    def select(self, contexts, k):
        """Indices (k,) of the kept pairs, ascending: greedy top-k of the scores (paper) or k draws without
        replacement from softmax(scores) with the scheduler's own generator (code)."""
        n = contexts.shape[0]
        if not 1 <= k <= n:
            raise ValueError(f"cannot keep {k} of {n} pairs")
        scores = self.scores(contexts).float().cpu()
        if self.settings.selection == "topk":
            keep = scores.topk(k).indices
        else:
            keep = torch.multinomial(torch.softmax(scores, 0), k, replacement=False, generator=self.generator)
        return keep.sort().values

    def remember(self, contexts, keep, margins, chosen_logps, features=None):
        """Hold round t until round t+1 can finish its reward. Features are kept only if a context net trains."""
        if self.trains_context_nets and features is None:
            raise ValueError("an unfrozen connector or encoder needs this round's features")
        self.pending = {
            "contexts": contexts.detach().float().cpu(),
            "keep": keep.cpu(),
            "margins": margins.detach().float().cpu(),
            "chosen_logps": chosen_logps.detach().float().cpu(),
            "likelihood": batch_likelihood(margins),
            "features": features.detach().float().cpu() if self.trains_context_nets else None,
        }

    def observe(self, margins):
        """Lagged update with round t's margins (n,): label round t-1's rows, train f_S and f_S', pool them.
        Returns metrics (`sams/...`); empty in the first round."""
        if self.pending is None:
            return {}
        s, p = self.settings, self.pending
        past_mean = self.past_reward_sum / self.past_reward_count if self.past_reward_count else None
        reward_b, raw = batch_reward(p["likelihood"], batch_likelihood(margins), past_mean)
        self.past_reward_sum, self.past_reward_count = self.past_reward_sum + raw, self.past_reward_count + 1
        labels = arm_labels(reward_b, sample_reward(p["margins"], p["chosen_logps"]), s.gamma)
        rows = slice(None) if s.label_all_pairs else p["keep"]
        features = p["features"][rows] if p["features"] is not None else None
        contexts, metrics = self._train(p["contexts"][rows], labels[rows], features)
        self.pool.append((contexts, labels[rows]))
        self.pending = None
        metrics["sams/batch_reward"], metrics["sams/batch_reward_raw"] = reward_b, raw
        metrics["sams/label_mean"], metrics["sams/pool_batches"] = labels[rows].mean().item(), len(self.pool)
        return metrics

    def step(self, features, margins, chosen_logps, k):
        """One round: observe (lagged update), contexts, select, remember. Returns (keep (k,), metrics)."""
        metrics = self.observe(margins)
        contexts = self.contexts(features)
        keep = self.select(contexts, k)
        self.remember(contexts, keep, margins, chosen_logps, features)
        return keep, metrics

    def _replay(self):
        """Up to replay_batches past batches, drawn uniformly without replacement: (contexts, labels) on CPU."""
        picks = torch.randperm(len(self.pool), generator=self.generator)[: self.settings.replay_batches]
        batches = [self.pool[i] for i in picks.tolist()]
        contexts = [torch.zeros(0, self.settings.context_size)] + [b[0] for b in batches]
        return torch.cat(contexts), torch.cat([torch.zeros(0)] + [b[1] for b in batches])

    def _train(self, contexts, labels, features):
        """train_steps full-batch Adam steps of f_S (MSE to the labels) on round t-1's rows + replay, then of f_S'
        on the residual y - f_S(x) of the updated f_S. Returns (round t-1's contexts to pool, metrics)."""
        s, dev = self.settings, self.device
        replay_x, replay_y = self._replay()
        y = torch.cat([labels, replay_y]).to(dev)
        replay_x = replay_x.to(dev)
        with private_rng(int(torch.randint(2**62, (1,), generator=self.generator)), dev):
            self.nets["exploit"].train()  # the encoder stays in eval mode: contexts do not get dropout
            for _ in range(s.train_steps):
                # unfrozen context nets see only round t-1's rows: the pool keeps contexts, not features
                x = contexts.to(dev) if features is None else self._encode(features)
                exploit_loss = F.mse_loss(self.nets["exploit"](torch.cat([x, replay_x]))[0], y)
                self.exploit_optimizer.zero_grad(set_to_none=True)
                exploit_loss.backward()
                self.exploit_optimizer.step()
            self.nets["exploit"].eval()
            if features is not None:
                contexts = self.contexts(features).cpu()
            metrics = {"sams/exploit_mse": exploit_loss.item()}
            if s.explore:
                metrics["sams/explore_mse"] = self._train_explore(torch.cat([contexts.to(dev), replay_x]), y)
        return contexts, metrics

    def _train_explore(self, x, y):
        """f_S' learns f_S's error: input downsample(f_S's activations), target y - f_S(x), both fixed."""
        s, net = self.settings, self.nets["explore"]
        with torch.no_grad():
            exploit, hidden = self.nets["exploit"](x)
            inputs, target = downsample(hidden, s.explore_downsample), y - exploit
        net.train()
        for _ in range(s.train_steps):
            loss = F.mse_loss(net(inputs)[0], target)
            self.explore_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.explore_optimizer.step()
        net.eval()
        return loss.item()

    def pretrain_step(self, features, labels):
        """SFT-time pretraining (paper: the encoder is pretrained with rewards built from the SFT loss): one Adam
        step of MSE(f_S(contexts(features)), labels) through f_S, connector and encoder (each parameter that
        requires grad). features (n, L, d) from layer_features (rejected_hidden=None for single sequences),
        labels (n,), e.g. arm_labels(batch_reward(M_prev, M), sample rewards) with M the mean SFT loss and a
        sample reward that is the min-max normalised negative per-sample loss. Returns the loss."""
        with private_rng(int(torch.randint(2**62, (1,), generator=self.generator)), self.device):
            self.nets["exploit"].train()
            loss = F.mse_loss(self.nets["exploit"](self._encode(features))[0], labels.to(self.device).float())
            self.pretrain_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.pretrain_optimizer.step()
            self.nets["exploit"].eval()
        return loss.item()

    def state_dict(self):
        optimizers = {name: opt.state_dict() for name, opt in self._optimizers().items()}
        return {
            "settings": asdict(self.settings),
            "nets": self._net_state(),
            "optimizers": optimizers,
            "pool": list(self.pool),
            "pending": self.pending,
            "past_reward_sum": self.past_reward_sum,
            "past_reward_count": self.past_reward_count,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state):
        if state["settings"] != asdict(self.settings):
            raise ValueError("SamS state was saved with different settings")
        # deep copy: optimizers and the pending round must not share tensors with the scheduler that saved them
        state = copy.deepcopy(state)
        self.load_nets(state["nets"])
        for name, opt in self._optimizers().items():
            opt.load_state_dict(state["optimizers"][name])
        self.pool = deque(state["pool"], maxlen=self.settings.pool_size)
        self.pending = state["pending"]
        self.past_reward_sum, self.past_reward_count = state["past_reward_sum"], state["past_reward_count"]
        self.generator.set_state(state["generator"])

    def load_nets(self, nets):
        """Load the nets' weights only (e.g. pretrained during SFT): optimizers, pool and rewards stay as they are.
        Strict, except that a frozen packaged MiniLM may be absent (see _net_state)."""
        try:
            missing, unexpected = self.nets.load_state_dict(nets, strict=False)
        except RuntimeError as e:  # a shape mismatch
            raise ValueError(f"SamS nets do not fit these sams settings: {e}") from None
        if unexpected or [k for k in missing if not (self.packaged_encoder and k.startswith("encoder."))]:
            raise ValueError(f"SamS nets do not fit these sams settings (missing {missing}, extra {unexpected})")

    def _net_state(self):
        """The nets' weights, less a frozen packaged MiniLM (43 MB that the package restores)."""
        state = self.nets.state_dict()
        if self.packaged_encoder:
            state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
        return state

    def _optimizers(self):
        optimizers = {"exploit": self.exploit_optimizer, "pretrain": self.pretrain_optimizer}
        if self.explore_optimizer is not None:
            optimizers["explore"] = self.explore_optimizer
        return optimizers
