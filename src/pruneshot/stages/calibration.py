"""BatchNorm recalibration on source images: one treatment for every source-side network.

Removing channels (or a sparsity fine-tune) leaves BatchNorm's running statistics describing a
network that no longer exists; some methods refresh them during their search, others do not. So
the pipeline re-estimates them the same way for every network of a replicate: at the end of
pretraining (the dense network every search starts from) and after every source-side search that
changed the network, on the same source training images (config ``bn_recalibration``).
"""

from __future__ import annotations

from typing import Any

from pruneshot.seeds import derive_seed


def calibration_seed(config: dict[str, Any], replicate: int) -> int:
    """The seed of the recalibration images of ``replicate``: shared by pretraining and every method."""
    return derive_seed(config["study"]["root_seed"], "search", replicate, "bn_recalibration")


def recalibrate(config: dict[str, Any], replicate: int, model: Any, train: Any, val: Any) -> dict[str, Any]:
    """Recalibrate ``model``'s BatchNorm statistics in place on the source training split ``train``
    (a :class:`pruneshot.data.splits.Split`) as ``config['bn_recalibration']`` says; the record entry:
    what was done and the source validation accuracy (fraction) before and after. Disabled: the
    model is untouched and the entry says so."""
    from pruneshot.training import accuracy, recalibrate_bn

    bc = config["bn_recalibration"]
    if not bc["enabled"]:
        return {"applied": False, "reason": "bn_recalibration.enabled is false"}
    before = accuracy(model, val.x, val.y)
    done = recalibrate_bn(model, train.x, images=bc["images"], batch_size=bc["batch_size"],
                          seed=calibration_seed(config, replicate))
    return {"applied": True, **done, "source_val_acc_before": before, "source_val_acc_after": accuracy(model, val.x,
                                                                                                          val.y)}
