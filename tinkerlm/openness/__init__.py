"""Openness: the licences, lineage and terms of models, and what a model derived here inherits from its parents.

`licences.inherit(parent_licences)` gives a derived model's licence, its obligations and warnings.
"""
