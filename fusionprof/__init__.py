"""fusionprof: train, export and profile image+text fusion models, and say which one to ship."""

__version__ = "0.1.0"
SCHEMA_VERSION = 1  # of every JSON record we write; bump on incompatible changes
