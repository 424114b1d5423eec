"""Tasks (T5 text formats, custom templates), data sources (files / TFDS / HF), tokenised batches.

Import the submodules directly (`jaxprompt.data.tasks`, `.sources`, `.pipeline`); this package file stays
empty so that importing one of them never pulls in the others' dependencies.
"""
