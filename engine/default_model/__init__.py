"""The embedded default model: a small Llama trained in about a minute on a generated corpus.

`tandem make-model` builds it into the user cache directory (see default_model_dir);
`ensure_default_model()` builds it on first use.
"""

from engine.default_model.build import default_model_dir, ensure_default_model, make_default_model

__all__ = ["default_model_dir", "ensure_default_model", "make_default_model"]
