"""`mu explain RUN --plot PNG`: the actor update seen in action space, at one real state.

Q(s, ·) over a 2-D slice of the action space (two action dimensions swept over [-1, 1], the
others held at μ(s)), with μ(s), the slope ∂Q/∂a drawn as an arrow from it, and μ'(s): where
one actor step (gradient ascent on Q(s, μ(s; u)) at this state, step size actor_lr) moves
the action. A second panel zooms in around μ(s) so that the step, often tiny, is visible.
With one action dimension the slice is the curve Q(s, a).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

from controller.errors import UsageError
from training import checkpoint
from training.algos import AnyAgent
from training.explain import actor_objective
from training.export import rollout_observations

GRID = 81


def one_actor_step(agent: AnyAgent, obs: torch.Tensor, lr: float) -> tuple[np.ndarray, ...]:
    """At one raw observation: (μ(s), ∂Q/∂a there, μ'(s) after u ← u + lr ∂Q(s, μ(s; u))/∂u,
    taken on a copy of the actor)."""
    inputs, q = actor_objective(agent, obs.unsqueeze(0))
    mu = agent.actor(*inputs).detach().requires_grad_(True)
    dq_da = torch.autograd.grad(q(mu).sum(), mu)[0][0]
    actor = copy.deepcopy(agent.actor)
    params = [p for p in actor.parameters() if p.requires_grad]
    grads = torch.autograd.grad(q(actor(*inputs)).sum(), params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=lr)  # ascent: the update minimises -Q
        moved = actor(*inputs)[0]
    return mu.detach()[0].numpy(), dq_da.numpy(), moved.numpy()


def q_on_grid(
    agent: AnyAgent, obs: torch.Tensor, mu: np.ndarray, dims: list[int], axes: list[np.ndarray]
) -> np.ndarray:
    """Q(s, a) with a = μ(s) except a[dims] swept over the product of `axes`."""
    mesh = np.meshgrid(*axes, indexing="xy")
    actions = np.tile(mu, (mesh[0].size, 1)).astype(np.float32)
    for d, m in zip(dims, mesh, strict=True):
        actions[:, d] = m.ravel()
    with torch.no_grad():
        _, q = actor_objective(agent, obs.unsqueeze(0).expand(len(actions), -1))
        values = q(torch.from_numpy(actions)).numpy()
    return values.reshape(mesh[0].shape)


def plot_action_slice(
    source: str | Path, out: str | Path, state: int = 0, dims: list[int] | None = None
) -> tuple[Path, str]:
    """Write the PNG; returns its path and a one-paragraph description of what it shows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, agent, meta, train_state = checkpoint.load(source, "cpu")
    replay = checkpoint.saved_replay(source, train_state)
    if replay is not None and replay.size > state:
        obs = torch.as_tensor(replay.recent_obs(state + 1)[0])
    else:
        obs = torch.as_tensor(rollout_observations(agent, meta, state + 1)[state])
    mu, dq_da, moved = one_actor_step(agent, obs, cfg.actor_lr)
    act_dim = len(mu)
    if dims is None:
        dims = sorted(np.argsort(-np.abs(dq_da))[: min(2, act_dim)].tolist())
    if len(dims) != min(2, act_dim) or not all(0 <= d < act_dim for d in dims):
        raise UsageError(f"--dims: give {min(2, act_dim)} action dimensions in [0, {act_dim})")
    step = moved - mu
    half = max(4 * float(np.abs(step[dims]).max()), 1e-3)  # the zoom window's half-width

    fig, panels = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, zoom in ((panels[0], False), (panels[1], True)):
        windows = [
            np.linspace(mu[d] - half, mu[d] + half, GRID) if zoom else np.linspace(-1, 1, GRID)
            for d in dims
        ]
        q = q_on_grid(agent, obs, mu, dims, windows)
        span = windows[0][-1] - windows[0][0]
        if act_dim == 1:
            _draw_curve(ax, windows[0], q, mu[0], dq_da[0], moved[0], span)
        else:
            _draw_slice(ax, windows, q, mu[dims], dq_da[dims], moved[dims], span, dims)
    panels[0].set_title(f"Q(s, ·) at a state of {meta['env_id']} ({cfg.algo})", fontsize=10)
    panels[1].set_title(f"zoom: one actor step (lr {cfg.actor_lr:g}) moves μ(s)", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    text = (
        f"action dims {dims}: μ(s) = {_fmt(mu[dims])}, ∂Q/∂a = {_fmt(dq_da[dims])}, "
        f"one actor step moves μ(s) by {_fmt(step[dims], 3)} "
        f"(cosine with ∂Q/∂a over all dims {_cosine(step, dq_da):.4f})"
    )
    return out, text


def _draw_slice(ax, windows, q, mu, slope, moved, span, dims) -> None:
    im = ax.contourf(windows[0], windows[1], q, levels=30, cmap="viridis")
    ax.figure.colorbar(im, ax=ax, label="Q")
    arrow = slope / (np.linalg.norm(slope) + 1e-12) * 0.25 * span
    ax.annotate("", mu + arrow, mu, arrowprops={"arrowstyle": "->", "color": "w", "lw": 2})
    ax.plot(*mu, "wo", ms=7, label="μ(s)")
    ax.plot(*moved, "r*", ms=10, label="μ(s) after one actor step")
    ax.plot([], [], color="w", label="∂Q/∂a (direction)")
    ax.set(xlabel=f"a[{dims[0]}]", ylabel=f"a[{dims[1]}]")
    ax.locator_params(nbins=5)
    ax.legend(fontsize=7, loc="lower left", facecolor="0.6")


def _draw_curve(ax, grid, q, mu, slope, moved, span) -> None:
    ax.plot(grid, q[0] if q.ndim > 1 else q, color="C0", label="Q(s, a)")
    q_mu = np.interp(mu, grid, q[0] if q.ndim > 1 else q)
    ax.plot([mu], [q_mu], "ko", label="μ(s)")
    dx = np.sign(slope) * 0.25 * span
    ax.annotate("", (mu + dx, q_mu), (mu, q_mu), arrowprops={"arrowstyle": "->", "lw": 2})
    ax.axvline(moved, color="r", ls="--", label="μ(s) after one actor step")
    ax.set(xlabel="a[0]", ylabel="Q")
    ax.locator_params(axis="x", nbins=5)
    ax.legend(fontsize=7)


def _fmt(x: np.ndarray, digits: int = 4) -> str:
    return "[" + ", ".join(f"{v:.{digits}g}" for v in x) + "]"


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y) + 1e-12))
