"""componentize-py looks up the class implementing an exported WIT resource
in a module named after its interface (`storage` here); the plugin lives in
app.py."""

from app import PartitionLog  # noqa: F401
