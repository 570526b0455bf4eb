"""QuaSID: collision-qualified semantic IDs, their tokenizers and the SID retrieval/ranking stack."""
