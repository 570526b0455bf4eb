"""QuaSID: collision-qualified semantic IDs, their tokenizers and the SID retrieval/ranking stack.

Stage packages in the order the data moves: `core` (contracts, io, layout, config, hashing),
`data`, `tokenizer`, `stack`, `evaluation`.
"""
