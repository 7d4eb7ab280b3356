"""The unpruned model: the baseline every relative score is measured against."""

from __future__ import annotations

from prunebench.methods.base import METHODS, MethodSpec, Stage

METHODS.add("vanilla", MethodSpec(name="vanilla", stage=Stage.NONE, source="no pruning",
                                  dtype="no scoring (nothing is pruned)",
                                  rounding="no budget: all N visual tokens kept"))
