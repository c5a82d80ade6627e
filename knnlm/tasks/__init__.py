"""fairseq tasks for datastore dumping and kNN-LM evaluation (registered on import)."""
