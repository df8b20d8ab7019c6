"""Dataset-card templates (Jinja2 Markdown), installed as the package ``seqpatch._cards``.

The folder stays at the top of the checkout where people look for it; ``pyproject.toml`` maps it
into the package (``[tool.setuptools] package-dir``) so a wheel carries the templates, and
``seqpatch.cards.templates_dir`` reads them with ``importlib.resources``.
"""
