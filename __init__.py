"""mimbench: masked-image-modeling ViTs from pretraining to every downstream result.

The repository root is the ``mimbench`` package (see ``[tool.setuptools.package-dir]`` in pyproject.toml):
``backbones/`` is imported as ``mimbench.backbones``, ``tables/`` as ``mimbench.tables`` and so on. The
top-level folders carry no ``__init__.py`` on purpose, so a folder such as ``tables/`` can never shadow an
installed library of the same name (PyTables is imported as ``tables``) even when Python runs from here.
"""

__version__ = "0.1.0"
