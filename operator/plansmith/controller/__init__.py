"""The operator: kopf handlers (handlers.py) around pure decisions (targets, rendering, status)."""
