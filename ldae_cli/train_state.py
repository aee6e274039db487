"""The train state every training checkpoint holds (one schema, written and read here), and the hooks through
which a run's extras (evaluations, online probes) take part in it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ldae_cli.checkpoint import Checkpoint, flatten_optimizer, load_state, unflatten_optimizer
from ldae_cli.errors import LdaeError, short


class TrainState:
    """What every training checkpoint holds besides the stage's own description, in one schema.

    tensors: `<module>.<param>` for each module (model, ema, heads, net, disc, ...) and
             `<optimizer>.state.<param index>.<key>` for each optimizer (optim, optim_disc, ...);
    extra:   step, total_steps, steps_per_epoch, epoch, finished, world_size, and `optimizers`:
             {name: its param groups and scalar state}, or null for an optimizer that has not stepped yet.
    """

    @staticmethod
    def write(step: int, total: int, steps_per_epoch: float, world: int, modules: dict[str, nn.Module | None],
              optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{name}.{k}": v for name, module in modules.items() if module is not None
                   for k, v in module.state_dict().items()}
        rests = {}
        for name, optimizer in optimizers.items():
            rests[name] = None
            if optimizer.state:
                flat, rests[name] = flatten_optimizer(optimizer.state_dict())
                # what each parameter's state holds, so that a dropped tensor is named on resume
                rests[name]["keys"] = sorted({k for entry in optimizer.state.values() for k in entry})
                tensors.update({f"{name}.{k}": v for k, v in flat.items()})
        extra = {"step": step, "total_steps": total, "steps_per_epoch": steps_per_epoch,
                 "epoch": step / steps_per_epoch, "finished": step >= total, "world_size": world,
                 "optimizers": rests}
        return tensors, extra

    @staticmethod
    def read(ck: Checkpoint, modules: dict[str, nn.Module | None], optimizers: dict[str, torch.optim.Optimizer]
             ) -> int:
        """Load the modules and optimizers of a resumed run; returns the step to continue from."""
        if "optimizers" not in ck.extra:
            raise LdaeError(f"{ck.path}: holds no train state to resume (written by an earlier ldae, or not by a "
                            "training run); start a new run from it instead")
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
                    raise LdaeError(f"{ck.path}: its {name} optimizer state does not fit this run's parameters "
                                    f"({short(exc)}); the file is damaged or was edited") from None
        return ck.extra["step"]

    @staticmethod
    def non_finite(modules: dict[str, nn.Module | None], optimizers: dict[str, torch.optim.Optimizer]) -> str | None:
        """The first weight or optimizer-state tensor holding a NaN or an infinity, by name; None when all are
        finite (what a checkpoint must be to be kept)."""
        for name, module in modules.items():
            for key, value in (module.state_dict().items() if module is not None else ()):
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


class Hook:
    """Something a run does besides its steps (detectron2's HookBase). Every method runs on every rank."""

    def state(self) -> dict:
        """JSON values written into every checkpoint's extra (and given back to `load_state` on resume)."""
        return {}

    def load_state(self, extra: dict) -> None:
        pass

    def wants_save(self, trainer) -> bool:
        """After an optimizer step: ask for a checkpoint at this step."""
        return False

    def after_step(self, trainer) -> None:
        """After the step's log line, before its checkpoint."""

    def after_last_save(self, trainer) -> bool:
        """The last step's checkpoint is written (training is safe); True asks for one more checkpoint."""
        return False


class Evaluation(Hook):
    """`evaluate(step)` at the steps `every(step)` names and after the last step. The latest result is part of
    the train state (extra['eval']), so a run killed after its last step but before the final evaluation
    finishes that evaluation on resume, and never trains again."""

    def __init__(self, evaluate: Callable[[int], dict], every: Callable[[int], bool] = lambda step: False):
        self.evaluate, self.every = evaluate, every
        self.latest: dict | None = None

    def state(self) -> dict:
        return {"eval": self.latest}

    def load_state(self, extra: dict) -> None:
        self.latest = extra.get("eval")

    def run(self, step: int) -> None:
        self.latest = {"step": step, **self.evaluate(step)}

    def wants_save(self, trainer):
        return self.every(trainer.step)

    def after_step(self, trainer):
        if self.every(trainer.step) and trainer.step < trainer.total_steps:
            self.run(trainer.step)

    def after_last_save(self, trainer):
        self.run(trainer.total_steps)
        return True

    def missing(self, total_steps: int) -> bool:
        return self.latest is None or self.latest.get("step") != total_steps
