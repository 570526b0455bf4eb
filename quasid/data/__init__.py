"""Data: dataset folders, the synthetic world and its truth, the Amazon import, splits and
sequences.
"""
