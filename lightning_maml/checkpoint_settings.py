"""A checkpoint's settings against a run's, compared before the checkpoint's weights are loaded.

The rule: the checkpoint supplies the weights and, when ``fit`` resumes, the training state
(step, optimizer and scheduler state, callbacks); every setting comes from the run's config,
command line or arguments. So ``test --ckpt_path C --model.eval_inner_steps 1`` adapts for 1 step
whatever C was trained with. Settings that differ from the checkpoint's are named in a warning,
with two exceptions: a different model (the weights would not fit, or would mean something else)
is refused, and when ``fit`` resumes, the meta-optimizer's and scheduler's settings (their
learning rates included) are restored from the checkpoint's state, which the warning says.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_maml import compat
from lightning_maml.checkpoint_io import check_finite_weights
from lightning_maml.hyperparameters import qualified_name

__all__ = ["check_checkpoint", "check_weights_fit", "setting_differences"]


def check_checkpoint(module: LightningModule, checkpoint: dict[str, Any]) -> None:
    """Compares ``checkpoint``'s settings with those of ``module``'s run, by the module's rule.

    Raises:
        ValueError: If the checkpoint was made for a different model.
    """
    trainer = compat.attached_trainer(module)
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    source = f"the checkpoint {path}" if path else "the checkpoint"
    saved = checkpoint.get("hyper_parameters") or {}
    differences = setting_differences(dict(module.hparams), dict(saved))
    model = {k: v for k, v in differences.items() if k == "model" or k.startswith("model.")}
    if model:
        listed = "; ".join(f"{k}: {now!r} here, {then!r} in it" for k, (now, then) in model.items())
        raise ValueError(
            f"{source} was trained with a different model ({listed}). Its weights cannot "
            "be used with this one: test or resume it with the recipe it was trained with, "
            "or set the model's settings to match."
        )
    check_weights_fit(module, checkpoint.get("state_dict"), source)
    check_finite_weights(checkpoint.get("state_dict") or {}, source)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    saved_data = checkpoint.get("datamodule_hyper_parameters")
    if datamodule is not None and saved_data:
        differences.update(
            setting_differences(dict(datamodule.hparams), dict(saved_data), prefix="data")
        )
    if not differences:
        return
    resuming = trainer is not None and trainer.state.fn == "fit"
    restored = ("meta_optimizer", "lr_scheduler")
    lines = []
    for name, (now, then) in differences.items():
        if resuming and name.split(".")[0] in restored:
            lines.append(f"  {name}: {then!r} (restored from the checkpoint; {now!r} given)")
        else:
            lines.append(f"  {name}: {now!r} (the checkpoint has {then!r})")
    rank_zero_warn(
        f"Settings that differ from those saved in {source}; the run uses the first value:\n"
        + "\n".join(lines),
        category=UserWarning,
    )


def check_weights_fit(module: LightningModule, saved: dict[str, Any] | None, source: str) -> None:
    """Raises ``ValueError`` if the weights ``saved`` do not fit ``module`` (names and shapes)."""
    # The settings cannot tell a model built in Python (not saved with them) from another:
    # the weights' names and shapes can, before Lightning's "size mismatch" dump.
    if saved is None:
        return
    own = module.state_dict()
    problems = [
        f"{k}: {tuple(v.shape)} in it, {tuple(own[k].shape)} here"
        for k, v in saved.items()
        if k in own and isinstance(v, Tensor) and v.shape != own[k].shape
    ]
    if module.strict_loading:
        problems += [f"{k}: missing in it" for k in own if k not in saved]
        problems += [f"{k}: not in this model" for k in saved if k not in own]
    if problems:
        shown = "; ".join(problems[:3]) + (
            f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        )
        raise ValueError(
            f"{source} holds weights of a different model ({shown}). Test or resume it "
            "with the model it was trained with."
        )


def setting_differences(now: dict, saved: dict, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """The settings present in both ``now`` and ``saved`` whose values differ: name -> (now, saved).

    Lists and tuples compare equal when their items do (YAML gives lists, Python code tuples).
    """
    flat_now, flat_saved = _flatten(now, prefix), _flatten(saved, prefix)
    return {
        name: (flat_now[name], flat_saved[name])
        for name in sorted(flat_now.keys() & flat_saved.keys())
        if _plain(flat_now[name]) != _plain(flat_saved[name])
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``; private keys (``_instantiator``) are left out."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if str(key).startswith("_") and str(key) != "_class_path":
            continue
        name = "class_path" if key == "_class_path" else str(key)
        if name == "class_path":
            value = _canonical(value)
        flat.update(_flatten(value, f"{prefix}.{name}" if prefix else name))
    return flat


def _plain(value: Any) -> Any:
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _canonical(class_path: Any) -> Any:
    """``lightning_maml.MAML`` and ``lightning_maml.algorithms.maml.MAML`` name one class."""
    if not isinstance(class_path, str) or "." not in class_path:
        return class_path
    module, _, name = class_path.rpartition(".")
    try:
        return qualified_name(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return class_path
