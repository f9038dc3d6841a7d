"""Locate (the paper's first stage, Meng et al. 2022): which layers hold the memory of a request.

`trace`: causal tracing on long-form answers; `maps`: the effects as layer × position-group maps and
the layer band they suggest.
"""
