"""The offline benchmark: tokenizers x seeds -> SIDs -> stack -> leave-one-out HR/NDCG.
"""
