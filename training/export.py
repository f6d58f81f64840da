"""Export the actor as one self-contained ONNX file (the contract in docs/contract.md):

    obs [batch, obs_dim] → normalizer → MLP → tanh → scale, bias → action [batch, act_dim]

(for TD7 the state encoder zs = f(s) runs inside the graph too, beside the MLP's input)

with metadata_props describing the env, and refused unless onnxruntime agrees with torch to
1e-5 on replayed and random observations, or, for a network whose float32 arithmetic is itself
that coarse (TD7's encoder, ELU and AvgL1Norm layers, reach 1e-5 between torch in float32 and in
float64), to 4× that rounding: two float32 evaluations each within e of the exact function
differ by up to 2e, and onnxruntime's exp and tanh kernels are not torch's.

`torch.onnx.export` takes seconds of CPU (building its operator registry, decomposing the
program), most of a fine-tuning learner's time when it exports every few dozen updates. An
`Exporter` exports a network once and keeps that graph as an `OnnxTemplate`: a later export of
the same architecture copies the graph with the network's current weights in place of the
template's (milliseconds). The parity check runs on every file either way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from controller import contract
from training import checkpoint
from training.algos import AnyAgent, deployed
from training.atomic import atomic_write
from training.config import TrainConfig
from training.envs import make_env, to_env_units
from training.history import with_history

log = logging.getLogger(__name__)

OPSET = 18
PARITY_TOL = 1e-5
PARITY_SAMPLES = 1000


class ParityError(RuntimeError):
    pass


def export_policy(
    agent: AnyAgent,
    meta: dict[str, Any],
    cfg: TrainConfig,
    path: str | Path,
    replay_obs: np.ndarray | None = None,
    exporter: Exporter | None = None,
) -> Path:
    """Write `path` (atomically) after checking parity; returns the path. With an `exporter`,
    a graph it exported before for this architecture is reused with the current weights; a
    reused graph that fails the parity check is exported again in full before refusing."""
    path = Path(path)
    policy = agent.policy(meta["action_low"], meta["action_high"])
    props = {**contract_props(meta, cfg.algo), "mu.config": cfg.to_json()}
    if exporter is None:
        data, reused = to_onnx(policy, meta["obs_dim"], props), False
    else:
        data, reused = exporter.to_onnx(policy, meta["obs_dim"], props)

    if replay_obs is None or len(replay_obs) == 0:
        replay_obs = rollout_observations(agent, meta, PARITY_SAMPLES)
    probes = np.concatenate(
        [replay_obs[-PARITY_SAMPLES:], random_observations(replay_obs, PARITY_SAMPLES)]
    )
    err, tol = parity_error(policy, data, probes)
    if reused and not err <= tol:
        assert exporter is not None
        log.warning("the reused graph is %.3g off (> %.3g): exporting in full", err, tol)
        exporter.stop_reusing()
        data, _ = exporter.to_onnx(policy, meta["obs_dim"], props)
        err, tol = parity_error(policy, data, probes)
    write_checked(path, data, err, len(probes), tol)
    (path.parent / f"{path.stem}.config.json").write_text(cfg.to_json())
    return path


def contract_props(meta: dict[str, Any], algo: str) -> dict[str, str]:
    """The metadata_props every policy file carries (docs/contract.md, the policy file)."""
    return {
        contract.FORMAT: contract.FORMAT_TAG,
        contract.ENV_ID: meta["env_id"],
        contract.OBS_DIM: str(meta["obs_dim"]),
        contract.ACT_DIM: str(meta["act_dim"]),
        contract.ACTION_LOW: json.dumps(meta["action_low"]),
        contract.ACTION_HIGH: json.dumps(meta["action_high"]),
        contract.OBS_LAYOUT: json.dumps(meta["obs_layout"]),
        "mu.algo": algo,
        "mu.train_steps": str(meta.get("train_steps", 0)),
        "mu.eval_return": json.dumps(meta.get("eval_return")),
        "mu.created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mu.randomization": json.dumps(meta.get("randomization", {})),
        "mu.export_rule": meta.get("export_rule", "last"),
        **({contract.HISTORY: json.dumps(meta["history"])} if meta.get("history") else {}),
    }


def to_onnx(policy: torch.nn.Module, obs_dim: int, props: dict[str, str]) -> bytes:
    """The graph `obs [batch, obs_dim] -> action` (dynamic batch) with `props` attached."""
    model = _export(policy, obs_dim).model_proto
    onnx.helper.set_model_props(model, props)
    return model.SerializeToString()


def _export(policy: torch.nn.Module, obs_dim: int) -> torch.onnx.ONNXProgram:
    """torch.onnx.export's program, with no option that adds work: OPSET is torchlib's own opset
    (the default, 20, runs the version converter), the optimizer (a tenth of a second) folds
    constants such as the clip bounds' casts, and report, verify and profile stay off."""
    with _quiet_exporter():
        return torch.onnx.export(
            policy,
            (torch.zeros(2, obs_dim),),
            input_names=[contract.INPUT_NAME],
            output_names=[contract.OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )


class Exporter:
    """`to_onnx` for repeated exports of one architecture (a fine-tuning learner's candidates,
    a training run's two files): the first export goes through `torch.onnx.export` and is kept
    as an `OnnxTemplate`; later ones fill it with the network's current weights, or export in
    full (and keep that graph instead) where the template does not fit."""

    def __init__(self) -> None:
        self.template: OnnxTemplate | None = None
        self.reuse = True
        self.full_exports = 0
        self.reused = 0

    def stop_reusing(self) -> None:
        """A filled template failed the parity check: export every graph in full from now on."""
        self.template, self.reuse = None, False

    def to_onnx(
        self, policy: torch.nn.Module, obs_dim: int, props: dict[str, str]
    ) -> tuple[bytes, bool]:
        """`to_onnx`'s file, and whether it was filled from the template."""
        model = self.template.fill(policy, obs_dim) if self.template is not None else None
        reused = model is not None
        if model is None:
            program = _export(policy, obs_dim)
            model = program.model_proto
            if self.reuse:
                self.template = OnnxTemplate.of(program, model, policy, obs_dim)
            self.full_exports += 1
        else:
            self.reused += 1
        onnx.helper.set_model_props(model, props)
        return model.SerializeToString(), reused


class OnnxTemplate:
    """An exported graph whose weights can be replaced: the exporter names each initializer
    that holds a parameter or buffer by its state_dict key (`actor.net.0.weight`,
    `normalizer.shift`, ...) in the layout torch keeps it in, so another network of the same
    architecture is the same graph with its own tensors under those names.

    `of` declines a graph in which some tensor the network computes with is not such an
    initializer (folded into a constant, or merged with another); `fill` declines a network
    that differs from the template's in anything but its tensors' values: its modules, their
    settings (a normalizer's clip is a constant in the graph) or a tensor's name, shape or
    dtype. Both return None, and `Exporter` exports in full.
    """

    def __init__(self, model: onnx.ModelProto, signature: tuple, slots: dict[str, int]) -> None:
        self.model = model
        self.signature = signature
        self.slots = slots  # state_dict key -> index of its initializer

    @classmethod
    def of(
        cls,
        program: torch.onnx.ONNXProgram,
        model: onnx.ModelProto,
        policy: torch.nn.Module,
        obs_dim: int,
    ) -> OnnxTemplate | None:
        """The template of `model`, `program`'s graph of `policy` (kept as a copy)."""
        signature = _signature(policy, obs_dim)
        if signature is None or program.exported_program is None:
            return None
        state = policy.state_dict()
        inits = {t.name: i for i, t in enumerate(model.graph.initializer)}
        graph_sig = program.exported_program.graph_signature
        lifted = {**graph_sig.inputs_to_parameters, **graph_sig.inputs_to_buffers}
        used = {
            lifted[n.name]
            for n in program.exported_program.graph.nodes
            if n.op == "placeholder" and n.name in lifted and n.users
        }
        if not used <= inits.keys():
            missing = sorted(used - inits.keys())
            log.info("not reusing the exported graph: no initializer holds %s", missing)
            return None
        slots = {name: inits[name] for name in state if name in inits}
        for name, i in slots.items():
            init = model.graph.initializer[i]
            if init.data_location == onnx.TensorProto.EXTERNAL or not _matches(init, state[name]):
                return None
        kept = onnx.ModelProto()
        kept.CopyFrom(model)
        return cls(kept, signature, slots)

    def fill(self, policy: torch.nn.Module, obs_dim: int) -> onnx.ModelProto | None:
        """A copy of the graph holding `policy`'s tensors, or None where it does not fit."""
        if _signature(policy, obs_dim) != self.signature:
            return None
        state = policy.state_dict()
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        for name, i in self.slots.items():
            init = model.graph.initializer[i]
            tensor = state.get(name)
            if tensor is None or init.name != name or not _matches(init, tensor):
                return None
            init.CopyFrom(onnx.numpy_helper.from_array(tensor.detach().cpu().numpy(), name))
        return model


def _matches(init: onnx.TensorProto, tensor: torch.Tensor) -> bool:
    """Whether `tensor` has the initializer's shape and element type."""
    dtype = onnx.helper.np_dtype_to_tensor_dtype(tensor.detach().cpu().numpy().dtype)
    return tuple(init.dims) == tuple(tensor.shape) and init.data_type == dtype


_SETTING = (bool, int, float, str, type(None))


def _signature(policy: torch.nn.Module, obs_dim: int) -> tuple | None:
    """What the graph depends on besides tensor values: the module tree, each module's
    settings (public attributes of plain types), and the name, shape and dtype of each tensor
    of the state_dict. None for a module with any other public attribute (a plain tensor is
    baked into the graph as a constant and would not be replaced)."""
    modules = []
    for name, module in policy.named_modules():
        settings = []
        for key, value in sorted(vars(module).items()):
            if key.startswith("_"):
                continue
            if isinstance(value, (tuple, list)) and all(isinstance(v, _SETTING) for v in value):
                value = tuple(value)
            elif not isinstance(value, _SETTING):
                return None
            settings.append((key, value))
        modules.append((name, type(module).__module__, type(module).__qualname__, tuple(settings)))
    tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in policy.state_dict().items())
    return obs_dim, tuple(modules), tensors


def write_checked(
    path: Path, data: bytes, err: float, n_probes: int, tol: float = PARITY_TOL
) -> None:
    """Write `data` to `path` atomically, or raise ParityError when `err` exceeds `tol`."""
    if not err <= tol:
        raise ParityError(
            f"onnxruntime differs from the reference by {err:.3g} > {tol:.3g}; not writing {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    log.info(
        "exported %s (parity max abs error %.2g <= %.2g on %d observations)",
        path, err, tol, n_probes,
    )  # fmt: skip


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs its optimisation passes at INFO and warns about torchvision."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def parity_error(
    policy: torch.nn.Module, onnx_bytes: bytes, obs: np.ndarray
) -> tuple[float, float]:
    """Largest absolute difference between torch and onnxruntime actions on `obs`, and the
    tolerance it is held to: PARITY_TOL, or 4× float32's own rounding of this network (torch
    in float32 against float64 on the same `obs`) when that is larger (module doc)."""
    obs = np.ascontiguousarray(obs, dtype=np.float32)
    with torch.no_grad():
        want = policy(torch.from_numpy(obs)).numpy()
        exact = copy.deepcopy(policy).double()(torch.from_numpy(obs).double()).numpy()
    rounding = float(np.max(np.abs(want - exact)))
    return onnx_error(onnx_bytes, obs, want), max(PARITY_TOL, 4 * rounding)


def onnx_error(onnx_bytes: bytes, obs: np.ndarray, want: np.ndarray) -> float:
    """Largest absolute difference between onnxruntime's actions on `obs` and `want`."""
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(
        [contract.OUTPUT_NAME], {contract.INPUT_NAME: np.ascontiguousarray(obs, dtype=np.float32)}
    )[0]
    return float(np.max(np.abs(got - want)))


def random_observations(reference: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Uniform draws over mean ± 3 std of `reference`, per dimension: off-distribution but
    plausible inputs, including ones that saturate the normalizer's clip."""
    rng = np.random.default_rng(seed)
    mean, std = reference.mean(0), reference.std(0) + 1e-3
    return rng.uniform(mean - 3 * std, mean + 3 * std, (n, reference.shape[1])).astype(np.float32)


def rollout_observations(
    agent: AnyAgent, meta: dict[str, Any], n: int, seed: int = 0
) -> np.ndarray:
    """Observations the policy itself visits, for parity checks when no replay buffer is at hand."""
    history = meta.get("history") or {"obs": 0, "actions": 0}
    env = with_history(make_env(meta["env_id"], seed), history["obs"], history["actions"])
    low, high = np.asarray(meta["action_low"]), np.asarray(meta["action_high"])
    out = []
    obs, _ = env.reset(seed=seed)
    while len(out) < n:
        out.append(obs)
        a = agent.act(torch.as_tensor(obs).unsqueeze(0))[0].cpu().numpy()
        obs, _, terminated, truncated, _ = env.step(to_env_units(a, low, high))
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.asarray(out, np.float32)


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """`mu export RUN_OR_CHECKPOINT --out policy.onnx`: the deployed actor (`algos.deployed`)
    of the run's agent.pt, which is the actor of its policy.onnx, or of the given checkpoint
    file (TD7's: its checkpoint policy)."""
    cfg, agent, meta, state = checkpoint.load(source, "cpu")
    replay = checkpoint.saved_replay(source, state)
    obs = replay.recent_obs(PARITY_SAMPLES) if replay is not None else None
    return export_policy(deployed(agent), meta, cfg, out, replay_obs=obs)
