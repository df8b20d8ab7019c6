"""seqpatch: where and how a language model tracks the values of variables.

The pipeline is a chain of versioned Hugging Face datasets (see ``seqpatch.stages``):
programs -> benchmark -> (choose) -> pairs -> activations -> patching -> charts.
Importing the package does no work: models, datasets and torch load only when used.
"""

__version__ = "0.1.0"
