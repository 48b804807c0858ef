"""capguard: serve a video captioner and catch its mode collapse.

The import package is ``capguard`` only: ``capguard.models`` (pure ML, no web stack) and
``capguard.server`` (the FastAPI service). In the repository they are the folders models/ and
server/ at the root; capguard/models and capguard/server are links to them, so the source tree,
an editable install and a wheel all import the same names.
"""

__version__ = "0.1.0"
