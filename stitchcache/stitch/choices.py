"""The stitch-layer choices of ``stitch.stitch_layers``: a family (architecture) plus its initialisation.

A choice is one name — the ``--stitch`` argument of `train`, the ``{stitch}`` wildcard and folder of
``results/stitch/{dataset}/{src}--{tgt}/layer{l}/{stitch}/{method}/seed{seed}/``, the ``kind`` of the stitch
config in a checkpoint and the ``stitch`` field of its eval.json:

  ============== ======== =======  ====================================================================
  choice         family   init     start of lfm / ffm / tlt (ffm_tlt always starts from its ffm run)
  ============== ======== =======  ====================================================================
  linear         linear   default  ``nn.Linear``'s default (Kaiming-uniform) random init
  linear_lstsq   linear   lstsq    closed-form least squares of target on source layer-l tokens
                                   (training split, ``lstsq.py``)
  mlp            mlp      default  random
  lora           lora     default  the source block l+1 (LoRA B = 0)
  ============== ======== =======  ====================================================================

The results table splits a choice into its ``stitch`` (family) and ``init`` columns, so one
experiment compares inits side by side. Torch-free: the report imports it.
"""
from __future__ import annotations

DEFAULT_INIT = "default"
INITS = (DEFAULT_INIT, "lstsq")
CHOICES = {
    "linear": ("linear", DEFAULT_INIT),
    "linear_lstsq": ("linear", "lstsq"),
    "mlp": ("mlp", DEFAULT_INIT),
    "lora": ("lora", DEFAULT_INIT),
}


def parse_choice(name: str) -> tuple[str, str]:
    """(family, init) of a stitch choice; a name this version does not know splits on a known init
    suffix (``<family>_<init>``), else is a family with the default init (the report reads any)."""
    if name in CHOICES:
        return CHOICES[name]
    for init in INITS[1:]:
        if name.endswith("_" + init) and len(name) > len(init) + 1:
            return name[: -len(init) - 1], init
    return name, DEFAULT_INIT


def choice_name(family: str, init: str | None = None) -> str:
    """The inverse of ``parse_choice``: ``linear`` + ``lstsq`` -> ``linear_lstsq``."""
    return family if init in (None, "", DEFAULT_INIT) else f"{family}_{init}"
