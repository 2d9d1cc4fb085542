"""Nowcasters that consume compiled neural graphs (NiNo GNN, WNN+, Linefit, Linefit+).

Depends on :mod:`neugraph`'s public API only. The nowcasters, the optimizer wrapper and the
training tasks land with their own issues; this package currently exposes nothing.
"""
