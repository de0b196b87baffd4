"""The MoE block-importance predictor of QuantMoE-Bench (code ``run-*-predictor.py``).

One small network per block, Linear(d -> h, no bias) -> ReLU -> Linear(h -> 1, no bias) -> Tanh, is
trained to predict, for each token, cos(x_t, y_t) between the MoE sub-block's input x (the residual
stream after attention, i.e. the input of the post-attention norm) and its output y = x + MoE(norm(x))
(the paper's default "variant A"). A block's score is the mean predicted similarity over the
calibration tokens; the lowest similarity (the block changes the hidden state most) is the most
important, so its experts deserve more bits.

To train in seconds on a CPU the defaults are smaller than the paper's (hidden 256 instead of 1024,
at most ``max_tokens`` sampled tokens per block, AdamW lr 1e-3 instead of 1e-4, mini-batches of 512,
fp32); the recipe is otherwise the same: MSE loss, weight decay 0.01, at most ``epochs`` epochs, early
stop after ``patience`` epochs without improvement on a 10% validation split. Inputs are divided by
their RMS over the training tokens (a stored constant) so one learning rate suits every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn



@dataclass(frozen=True)
class PredictorConfig:
    hidden: int = 256  # paper: 1024
    max_tokens: int = 16384  # tokens sampled per block for training and scoring
    epochs: int = 60
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch: int = 512
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 1 or self.max_tokens < 2 or self.epochs < 1 or self.batch < 1:
            raise ValueError("predictor hidden, max_tokens, epochs and batch must be positive")


class BlockPredictor(nn.Module):
    """x (N, d) -> predicted cos(x, y) (N,)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, 1, bias=False),
                                 nn.Tanh())
        self.register_buffer("x_scale", torch.ones(()))  # RMS of the training inputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / self.x_scale).squeeze(-1)  # (N,)


def token_cos(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity of x and y (..., d) -> (N,)."""
    x = x.reshape(-1, x.shape[-1]).float()  # (N, d)
    y = y.reshape(-1, y.shape[-1]).float()  # (N, d)
    return nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8)


class TokenSampler:
    """Keeps a uniform random sample of at most ``cap`` (x, cos) rows out of a known total, batch by batch."""

    def __init__(self, total: int, cap: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(total, generator=g)[: min(cap, total)]
        self.mask = torch.zeros(total, dtype=torch.bool)
        self.mask[keep] = True
        self.pos = 0
        self.x: list[torch.Tensor] = []
        self.t: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, target: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # (N, d)
        m = self.mask[self.pos: self.pos + x.shape[0]].to(x.device)  # (N,)
        self.pos += x.shape[0]
        self.x.append(x[m].detach().float().cpu())  # kept on CPU, fp32
        self.t.append(target[m].detach().float().cpu())

    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat(self.x), torch.cat(self.t)  # (n, d), (n,)


@torch.enable_grad()
def train_predictor(X: torch.Tensor, t: torch.Tensor, cfg: PredictorConfig) -> tuple[BlockPredictor, dict]:
    """Fit one predictor on X (n, d) -> targets t (n,). Returns (predictor in eval mode, training facts)."""
    if X.shape[0] < 2:
        raise ValueError("too few calibration tokens to train a block predictor; raise --nsamples or --seqlen")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(X.shape[0], generator=g)
    n_val = max(1, int(round(cfg.val_fraction * X.shape[0])))
    val, tr = perm[:n_val], perm[n_val:]
    torch.manual_seed(cfg.seed)
    model = BlockPredictor(X.shape[1], cfg.hidden)
    model.x_scale.fill_(float(X[tr].float().pow(2).mean().sqrt().clamp_min(1e-8)))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, bad, epochs = float("inf"), None, 0, 0
    for epoch in range(cfg.epochs):
        epochs = epoch + 1
        model.train()
        order = tr[torch.randperm(tr.numel(), generator=g)]
        for s in range(0, order.numel(), cfg.batch):
            idx = order[s: s + cfg.batch]
            loss = nn.functional.mse_loss(model(X[idx]), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            v = float(nn.functional.mse_loss(model(X[val]), t[val]))
        if v < best - 1e-9:
            best, bad = v, 0
            best_state = {k: p.detach().clone() for k, p in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        pred = model(X)  # (n,)
    return model, {"val_mse": best, "epochs": epochs, "tokens": int(X.shape[0]),
                   "predicted_cos": float(pred.mean()), "sampled_cos": float(t.mean())}


def save_predictors(predictors: dict[int, BlockPredictor], path: str | Path) -> None:
    """All blocks' predictors in one safetensors file: ``block.<i>.<param>`` plus the hidden width."""
    from safetensors.torch import save_file

    tensors = {f"block.{i}.{k}": v.contiguous() for i, p in predictors.items() for k, v in p.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "moeq-block-predictors"})


def load_predictors(path: str | Path) -> dict[int, BlockPredictor]:
    from safetensors.torch import load_file

    flat = load_file(str(path))
    by_block: dict[int, dict] = {}
    for k, v in flat.items():
        _, i, rest = k.split(".", 2)
        by_block.setdefault(int(i), {})[rest] = v
    out = {}
    for i, sd in sorted(by_block.items()):
        hidden, d = sd["net.0.weight"].shape
        p = BlockPredictor(d, hidden)
        p.load_state_dict(sd)
        out[i] = p.eval()
    return out
