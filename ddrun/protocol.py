"""The evaluation protocol as plain fields, and the one line that describes it.

Every accuracy ddrun prints states its protocol. Evaluators return their protocol as fields
(``Evaluator.protocol_fields``); the run record (``results.json``), the logs and ``ddrun report`` all describe it
with :func:`describe`, so one protocol is always written the same way and two runs are comparable exactly when
their fields are equal.

Fields (plain JSON values):
    evaluator       "default" | "cross_arch" | ... (the evaluator's kind)
    archs           architecture names, in order
    nets            {arch: {constructor keyword: value}} (e.g. a narrow ConvNet)
    num_eval        networks trained per architecture
    epochs          training epochs on S
    optimizer       "sgd" | "adamw" | ...
    lr, momentum, weight_decay, batch
    lr_schedule     e.g. "x0.1 at half"
    augment         DSA strategy or "none"
    learned_lr      the networks train with S's learned step size when S has one
    labels          how labels are used: "as stored" (hard or soft cross-entropy), "teacher" (KD) ...
    test            the test set: {"dataset", "images"} (filled in by the run record)
"""

from __future__ import annotations

from typing import Any


def describe(p: dict[str, Any]) -> str:
    """One line for protocol fields ``p`` (module doc); unknown extra fields are appended as ``key value``."""
    archs = "/".join(p.get("archs") or ["?"])
    nets = p.get("nets") or {}
    if len(nets) == 1:
        kw = next(iter(nets.values())) or {}
        if kw:
            archs += "(" + ", ".join(f"{k} {v}" for k, v in kw.items()) + ")"
    elif len(p.get("archs") or []) > 1:
        archs += " each"
    line = (f"{archs} x{p.get('num_eval')}, {p.get('epochs')} epochs, {str(p.get('optimizer', 'sgd')).upper()} "
            f"lr {p.get('lr')} ({p.get('lr_schedule', 'constant')}), mom {p.get('momentum')}, "
            f"wd {p.get('weight_decay')}, batch {p.get('batch')}, aug {p.get('augment', 'none')}")
    if p.get("learned_lr"):
        line += ", learned lr when S has one"
    if p.get("labels") and p["labels"] != "as stored":
        line += f", labels {p['labels']}"
    known = {"evaluator", "archs", "nets", "num_eval", "epochs", "optimizer", "lr", "lr_schedule", "momentum",
             "weight_decay", "batch", "augment", "learned_lr", "labels", "test"}
    extra = [f"{k} {v}" for k, v in p.items() if k not in known]
    if extra:
        line += ", " + ", ".join(extra)
    test = p.get("test")
    if test:
        line += f"; test {test.get('dataset')} ({test.get('images')} images)"
    return line


def net_name(factory) -> str:
    """The architecture's name in protocols: the lower-cased class (or function) a net factory builds, e.g.
    ``convnet`` for ``ddrun.nets.ConvNet``, ``lenet``, ``resnet18``, ``dd_net``."""
    target = getattr(factory, "func", factory)
    return str(getattr(target, "__name__", type(target).__name__)).lower()


def net_kwargs(factory) -> dict:
    """The constructor keywords of a net factory (a ``functools.partial`` from ``_partial_: true``)."""
    return {k: v for k, v in sorted(getattr(factory, "keywords", {}).items())}


def with_labels(result: dict, meta: dict) -> dict:
    """``result`` (an evaluator's) with its ``labels`` field naming where S's stored labels come from when S's
    ``meta`` records a relabel stage (``meta["relabel"]``: teachers and temperature), for every protocol that
    trains on S's labels (not ``kd``, whose students are labelled by its own teachers); the ``protocol`` line is
    described again. Other results are returned as they are."""
    relabel = meta.get("relabel")
    fields = result.get("protocol_fields") or {}
    if not relabel or fields.get("evaluator") == "kd":
        return result
    keep = ", own label where they disagree" if relabel.get("disagree") == "keep" else ""
    fields = {**fields, "labels": f"{fields.get('labels', 'as stored')}, S's labels: soft at T "
                                  f"{float(relabel.get('temperature', 1.0)):g} from {relabel.get('teachers')}{keep}"}
    return {**result, "protocol_fields": fields, "protocol": describe(fields)}
