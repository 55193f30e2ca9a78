"""Binarization (BiPFT): ``binarizers`` (BWN weights, elastic 1-bit activations and their
straight-through estimators), ``modules`` (binary Linear / embedding, low-rank residual
estimators). The binarize stage, its export and cost accounting build on these.
"""
