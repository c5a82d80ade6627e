"""fairseq tasks for kNN-LM evaluation (registered on import).

* ``knnlm_language_modeling`` -- ``fairseq-eval-lm`` of the kNN-LM interpolation in one pass.
"""

from knnlm.tasks.knnlm_language_modeling import KnnInterpolatedLM, KnnLanguageModelingTask

__all__ = ["KnnInterpolatedLM", "KnnLanguageModelingTask"]
