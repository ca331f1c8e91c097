"""``--ckpt_path`` beside a config: the user's values win, the architecture must agree.

LightningCLI merges a checkpoint's hyperparameters over the whole model config, so a new lr or
schedule given beside ``--ckpt_path`` was silently replaced. cm keeps the user's config instead:
``compare`` refuses a config whose architecture differs from the checkpoint's (its weights would
not fit) and lists the optimizer and LR-scheduler values that changed; ``ResumeOverrides``
writes those into the restored optimizer and scheduler states, which would otherwise bring back
the old ``lr`` in ``param_groups``.
"""

from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from cm.errors import UserError

# Sub-configs whose weights are in the checkpoint: they must match it.
ARCHITECTURE = ("denoiser", "predictor", "discriminator")
# The module arguments that configure optimizers, in configure_optimizers' order.
OPTIMIZERS = ("optimizer", "discriminator_optimizer")
SCHEDULER = "lr_scheduler"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists and tuples are leaves (as lists)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): list(value) if isinstance(value, tuple) else value}


def _differ(old: Any, new: Any) -> list[str]:
    """Keys of ``new`` whose value differs from ``old`` (keys only one side has are skipped)."""
    old_flat, new_flat = flatten(old or {}), flatten(new or {})
    return [k for k, v in new_flat.items() if k in old_flat and old_flat[k] != v]


def compare(path: str, hparams: dict[str, Any], model: dict[str, Any]) -> "ResumeOverrides":
    """Refuse architecture changes against checkpoint ``path``; the optimizer/scheduler changes.

    Args:
        path: the checkpoint, named in errors.
        hparams: its ``hyper_parameters`` (``_class_path`` and the module's arguments).
        model: the user's model config (``class_path``, ``init_args``).

    Raises:
        UserError: naming the keys of the module class, architecture or optimizer class that
            differ, which the checkpoint's weights and states cannot follow.
    """
    init = model.get("init_args") or {}
    changed = []
    if hparams.get("_class_path") not in (None, model.get("class_path")):
        changed.append("model.class_path")
    for name in ARCHITECTURE:
        changed += [
            f"model.init_args.{name}.{k}" for k in _differ(hparams.get(name), init.get(name))
        ]
    for name in (*OPTIMIZERS, SCHEDULER):
        old, new = hparams.get(name) or {}, init.get(name) or {}
        if old and new and old.get("class_path") != new.get("class_path"):
            changed.append(f"model.init_args.{name}.class_path")
    if changed:
        raise UserError(
            f"--ckpt_path '{path}' was trained with other values of {', '.join(changed)}: its "
            "weights and optimizer state cannot take them, so drop these overrides (the "
            "architecture comes from the checkpoint) or train a new run without --ckpt_path."
        )
    optimizers = [_changes(hparams.get(n), init.get(n)) for n in OPTIMIZERS if init.get(n)]
    return ResumeOverrides(optimizers, _changes(hparams.get(SCHEDULER), init.get(SCHEDULER)))


def _changes(old: Any, new: Any) -> dict[str, tuple[Any, Any]]:
    """``{init_arg: (checkpoint value, new value)}`` for the init_args the user changed."""
    old_args, new_args = (old or {}).get("init_args") or {}, (new or {}).get("init_args") or {}
    return {k: (old_args[k], v) for k, v in new_args.items() if k in old_args and old_args[k] != v}


class ResumeOverrides(Callback):
    """Apply changed optimizer and LR-scheduler arguments to the states a resume restores.

    A new ``lr`` scales the restored learning rates (``param_groups`` and a scheduler's
    ``base_lrs``/``_last_lr``) by ``new / old``, so a warmup or decay in progress continues at
    the new scale; other optimizer arguments (betas, weight decay, ...) replace the restored
    value; changed scheduler arguments (``total_iters``, ``gamma``, ...) replace the restored
    attribute. Moments and step counts are restored unchanged.

    Args:
        optimizers: per optimizer, ``{argument: (old, new)}``.
        scheduler: ``{argument: (old, new)}`` of the (first) LR scheduler.
    """

    def __init__(
        self,
        optimizers: list[dict[str, tuple[Any, Any]]],
        scheduler: dict[str, tuple[Any, Any]],
    ) -> None:
        self.optimizers, self.scheduler = optimizers, scheduler

    def __bool__(self) -> bool:
        return any(self.optimizers) or bool(self.scheduler)

    def on_load_checkpoint(  # noqa: D102 - Lightning hook
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before Lightning loads optimizer_states and lr_schedulers from this same dict.
        states = checkpoint.get("optimizer_states")
        if states is None:  # sharded (cm.training.FSDP): already loaded into the optimizers
            states = [{"param_groups": optimizer.param_groups} for optimizer in trainer.optimizers]
        schedulers = checkpoint.get("lr_schedulers") or []
        for index, (state, changes) in enumerate(zip(states, self.optimizers, strict=False)):
            for key, (old, new) in changes.items():
                if key == "lr":
                    scale = new / old if old else None
                    for group in state["param_groups"]:
                        group["lr"] = group["lr"] * scale if scale else new
                        if "initial_lr" in group:
                            group["initial_lr"] = new
                    if index == 0 and schedulers:
                        for name in ("base_lrs", "_last_lr"):
                            if name in schedulers[0]:
                                schedulers[0][name] = [
                                    v * scale if scale else new for v in schedulers[0][name]
                                ]
                    continue
                for group in state["param_groups"]:
                    if key in group:
                        group[key] = tuple(new) if isinstance(group[key], tuple) else new
        for key, (_, new) in self.scheduler.items():
            if schedulers and key in schedulers[0]:
                schedulers[0][key] = new
