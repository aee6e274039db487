"""The train state every training checkpoint holds: one schema, written and read here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldae_cli.errors import LdaeError, short
from ldae_cli.runs.checkpoint import Checkpoint, flatten_optimizer, load_state, unflatten_optimizer


class TrainState:
    """What every training checkpoint holds besides the stage's own description, in one schema: a run's modules
    (the EMA copy among them), optimizers and the checkpoints it was made from (`parents`). `non_finite` is the
    stage's own rule for what the NaN guard refuses to save (default: any weight or optimizer state).

    tensors: `<module>.<param>` for each module (model, ema, heads, net, disc, ...) and
             `<optimizer>.state.<param index>.<key>` for each optimizer (optim, optim_disc, ...);
    extra:   step, total_steps, steps_per_epoch, epoch, finished, world_size, and `optimizers`:
             {name: its param groups and scalar state}, or null for an optimizer that has not stepped yet.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module | None],
        optimizers: dict[str, torch.optim.Optimizer],
        ema=None,
        parents: Sequence[dict] = (),
        non_finite=None,
    ):
        self.ema = ema  # timm's ModelEmaV3 of modules["model"], or None
        self.modules = {**modules, **({"ema": ema.module} if ema is not None else {})}
        self.optimizers, self.parents, self.rule = optimizers, list(parents), non_finite

    def first_non_finite(self) -> str | None:
        """What of the state is not finite (None: all of it is), by the stage's rule when it has one."""
        return self.rule() if self.rule is not None else self.non_finite(self.modules, self.optimizers)

    @staticmethod
    def write(
        step: int,
        total: int,
        steps_per_epoch: float,
        world: int,
        modules: dict[str, nn.Module | None],
        optimizers: dict[str, torch.optim.Optimizer],
    ) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {
            f"{name}.{k}": v
            for name, module in modules.items()
            if module is not None
            for k, v in module.state_dict().items()
        }
        rests: dict[str, dict | None] = {}
        for name, optimizer in optimizers.items():
            rests[name] = None
            if optimizer.state:
                flat, rest = flatten_optimizer(optimizer.state_dict())
                # what each parameter's state holds, so that a dropped tensor is named on resume
                rest["keys"] = sorted({k for entry in optimizer.state.values() for k in entry})
                rests[name] = rest
                tensors.update({f"{name}.{k}": v for k, v in flat.items()})
        extra = {
            "step": step,
            "total_steps": total,
            "steps_per_epoch": steps_per_epoch,
            "epoch": step / steps_per_epoch,
            "finished": step >= total,
            "world_size": world,
            "optimizers": rests,
        }
        return tensors, extra

    @staticmethod
    def read(ck: Checkpoint, modules: dict[str, nn.Module | None], optimizers: dict[str, torch.optim.Optimizer]) -> int:
        """Load the modules and optimizers of a resumed run; returns the step to continue from."""
        if "optimizers" not in ck.extra:
            raise LdaeError(
                f"{ck.path}: holds no train state to resume (written by an earlier ldae, or not by a "
                "training run); start a new run from it instead"
            )
        for name, module in modules.items():
            if module is not None:
                load_state(module, ck.section(name), f"{ck.path} ({name})")
        for name, optimizer in optimizers.items():
            rest = ck.extra["optimizers"].get(name)
            if rest is not None:
                try:
                    state = unflatten_optimizer(ck.section(name), rest)
                    _check_state_keys(state, rest)
                    _load_optimizer(optimizer, state)
                except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
                    raise LdaeError(
                        f"{ck.path}: its {name} optimizer state does not fit this run's parameters "
                        f"({short(exc)}); the file is damaged or was edited"
                    ) from None
        return ck.extra["step"]

    @staticmethod
    def non_finite(modules: dict[str, nn.Module | None], optimizers: dict[str, torch.optim.Optimizer]) -> str | None:
        """The first weight or optimizer-state tensor holding a NaN or an infinity, by name; None when all are
        finite (what a checkpoint must be to be kept)."""
        for name, module in modules.items():
            for key, value in module.state_dict().items() if module is not None else ():
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    return f"{name}.{key}"
        for name, optimizer in optimizers.items():
            for index, entry in optimizer.state.items():
                for key, value in entry.items():
                    if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                        return f"{name} state of parameter {index} ({key})"
        return None


def _check_state_keys(state: dict, rest: dict) -> None:
    """Every parameter's optimizer state holds the same entries (those recorded when it was saved): a tensor
    removed from the file would otherwise surface as a KeyError inside the optimizer's step."""
    expected = set(rest.get("keys") or ())
    for index, entry in state["state"].items():
        if not expected:
            expected = set(entry)
        if set(entry) != expected:
            missing = sorted(expected - set(entry)) or sorted(set(entry) - expected)
            raise ValueError(f"parameter {index} lacks or has extra state {', '.join(missing)}")


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    device = next(iter(optimizer.param_groups[0]["params"])).device
    for entry in state["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value) and key != "step":  # AdamW keeps `step` on the CPU unless fused/capturable
                entry[key] = value.to(device)
    optimizer.load_state_dict(state)
