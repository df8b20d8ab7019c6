"""seqpatch: where and how a language model tracks the values of variables.

The pipeline is a chain of versioned Hugging Face datasets (see ``seqpatch.stages``):
programs -> benchmark -> (choose) -> pairs -> activations -> patching -> charts.
Importing the package does no work: models, datasets and torch load only when used;
``seqpatch.Study`` (the results API, ``seqpatch.views``) loads on first use.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Study":
        from seqpatch.views import Study

        return Study
    raise AttributeError(f"module 'seqpatch' has no attribute {name!r}")
