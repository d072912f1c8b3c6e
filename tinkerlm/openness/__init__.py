"""Openness: the licences, lineage and terms of models, and how open a model is.

`licences.inherit(parent_licences)` gives a derived model's licence, its obligations and warnings; `assess(name)`
grades a stored model by the Model Openness Framework and the Open Source AI Definition (`report`, `evidence`,
`mof`, `declaration`).
"""


def assess(name: str, **kwargs):
    """`tinkerlm.openness.report.assess` (imported on use: `licences` is read by every remix and stays light)."""
    from tinkerlm.openness.report import assess as _assess

    return _assess(name, **kwargs)
