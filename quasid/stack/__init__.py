"""The SID stack: trie, retriever, ranker, their shared training loop, offline metrics, the
serving `Stack` and its build stage. Reads SID tables; never imports `quasid.tokenizer`.
"""
