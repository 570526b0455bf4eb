"""The SID tokenizers: config, encoder, quantizer, losses, positive pairs, batches, the model,
the fit loop, the `Tokenizer` and its registry, SID tables, SID metrics and the stage.

Never imports `quasid.stack`: the SID table (`quasid.core.schemas.SID_TABLE`) is the link.
"""
