"""The zero-shot head's result written into its folder of the staged run, and its row of the grid's table.

One folder, as logreg's: ``config.json`` (the class names that filled the templates among its fields), ``best.pt``
(an ordinary checkpoint that records ``l2_normalize``, so live and the export normalise as the head did),
``classes.csv`` (each class and its prompt name), the report (saying no training image was used) with
``per_class.csv`` and ``confusions.csv``, and ``result.json`` (0 shots, selected by "none").
"""
from __future__ import annotations

import math

from pipeline.common.checkpoint import make_checkpoint, save_checkpoint
from pipeline.heads.publish.files import layer_attrs, write_config, writing
from pipeline.heads.publish.heads import write_report, write_rows
from pipeline.heads.publish.place import HeadOutcome, Place, Publisher, one_folder
from pipeline.heads.publish.result import publish_result, result_record
from pipeline.heads.zeroshot import ZeroShotResult

NO_IMAGES = "zero-shot: no training images used"


def write_zeroshot(result: ZeroShotResult, place: Place) -> HeadOutcome:
    """config.json, classes.csv, best.pt, the report and result.json."""
    config, folder = place.settings.config, place.folder()
    record = place.record(config, selected_by="none", templates=result.templates, class_names=list(result.class_names),
                          logit_scale=result.logit_scale, text_weights=config.weights or place.train.attrs["weights_spec"],
                          text_fingerprint=result.fingerprint)
    write_config(place.stage, folder, record)
    write_rows(place, folder / "classes.csv", [{"wnid": wnid, "name": name, "prompt_name": prompt}
                                               for wnid, name, prompt in zip(place.train.wnids, place.train.names,
                                                                             result.class_names)])
    predictions = result.predictions
    metrics = {"epoch": 0, "val_top1": predictions.val_top1, "val_top5": predictions.val_top5,
               "logit_scale": result.logit_scale}
    with writing(place.stage, folder / "best.pt"):
        save_checkpoint(make_checkpoint(result.state, metrics=metrics, epoch=0, cache_attrs=layer_attrs(place.train),
                                        wnids=place.train.wnids, names=place.train.names, config=record,
                                        l2_normalize=True), folder / "best.pt")
    params = f"{result.templates} prompt templates"
    write_report(place, folder, predictions, epoch=0,
                 summary=f"CLIP zero-shot, class vectors from {result.templates} prompt templates, exp(logit_scale) "
                         f"{math.exp(result.logit_scale):.2f}:",
                 extra=[f"CLIP {NO_IMAGES}: the head was built from the class names alone (classes.csv) and the "
                        "text tower of the cache's own model; val evaluated once.",
                        "Probabilities are softmax(exp(logit_scale) * cosine(image embedding, class vector))."])
    row = place.row(params=params, val_top1=predictions.val_top1, val_top5=predictions.val_top5, train_images=0,
                    seconds=result.seconds, folder=folder, checkpoint=folder / "best.pt", selected_by="none")
    publish_result(place, folder, result_record(
        place, selected_by="none", chosen=True, hyper_parameters=params, top1=predictions.val_top1,
        top5=predictions.val_top5, mean_per_class=predictions.mean_per_class, train_images=0, seconds=result.seconds,
        checkpoint=True, templates=result.templates, logit_scale=result.logit_scale))
    return HeadOutcome(rows=(row,), names=(place.settings.name,), best=row,
                       best_name=place.title(folder).name if place.grid else ".")


ZEROSHOT = Publisher(files=("config.json", "classes.csv", "best.pt", "per_class.csv", "confusions.csv", "report.md",
                            "result.json"), folders=one_folder, write=write_zeroshot)
