"""fairseq criterions for regularized kNN-LM training (registered on import)."""
