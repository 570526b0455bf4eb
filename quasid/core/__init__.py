"""Shared basics every package may use: schemas, atomic io, folder layout, the config idiom,
stable hashing, the Recommender protocol, the LR schedule. No torch, no other project package.
"""
