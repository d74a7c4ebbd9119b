"""Triton kernels (fused MoE routing/experts, fused top-k KD loss). Imports no other project package.

Never give this package a distribution version: transformers probes a top-level `kernels` module for the
hub-kernels package and must keep finding "not available" here.
"""
