"""peftexport: PEFT for Segment Anything, exact merge, verified export.

This top-level module imports nothing heavy on purpose: ``peft_export.runtime``
must stay importable in an environment without torch.
"""

__version__ = "0.1.0"
