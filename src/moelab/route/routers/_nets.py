"""torch modules of the model routers (imported lazily by the routers that train one)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MLP(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(d_in, hidden)
        self.l2 = torch.nn.Linear(hidden, d_out)

    def forward(self, x_PD):
        return self.l2(F.gelu(self.l1(x_PD)))



class MF(torch.nn.Module):
    """RouteLLM's MFModel: delta(m, x) = w2^T (normalize(v_m) * (W1 x))."""

    def __init__(self, n_models: int, d_in: int, dim: int) -> None:
        super().__init__()
        self.P = torch.nn.Embedding(n_models, dim)
        self.text_proj = torch.nn.Linear(d_in, dim, bias=False)
        self.classifier = torch.nn.Linear(dim, 1, bias=False)

    def forward(self, x_PD):  # -> delta_PM
        v_MH = F.normalize(self.P.weight, dim=1)
        return self.classifier(self.text_proj(x_PD)[:, None, :] * v_MH[None]).squeeze(-1)



class DCEncoder(torch.nn.Module):
    def __init__(self, d_in: int, hidden: int, n_models: int) -> None:
        super().__init__()
        self.enc = MLP(d_in, hidden, hidden)
        self.k_MH = torch.nn.Parameter(torch.randn(n_models, hidden) * 0.1)

    def forward(self, x_PD):  # -> (z_PH normalised, sim_PM cosine)
        z = F.normalize(self.enc(x_PD), dim=-1)
        return z, z @ F.normalize(self.k_MH, dim=-1).T



class Policy(torch.nn.Module):
    """pi(m | x, w) for the preference w = (1 - mu, mu). ``bilinear``: logits = (1 - mu) a(x) -
    mu b(x) + c(x, w), two heads weighted by the preference as the reward is (so the quality-only
    end is not a faint 2-of-D-inputs signal), plus the plain head c on [x, w]."""

    def __init__(self, d_in: int, hidden: int, n_models: int, bilinear: bool = False) -> None:
        super().__init__()
        self.bilinear, self.n_models = bilinear, n_models
        self.net = MLP(d_in + 2, hidden, n_models * (3 if bilinear else 1))

    def forward(self, x_PD, mu_P):  # preference vector w = (1 - mu, mu)
        out = self.net(torch.cat([x_PD, (1 - mu_P)[:, None], mu_P[:, None]], 1))
        if not self.bilinear:
            return out
        a, b, c = out.split(self.n_models, dim=1)
        return (1 - mu_P)[:, None] * a - mu_P[:, None] * b + c
