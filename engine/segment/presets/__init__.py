"""Packaged segmentation workflows (``<name>.yaml``), loaded by
:func:`engine.segment.workflow.load_workflow`; see :data:`engine.segment.workflow.PRESETS`."""
