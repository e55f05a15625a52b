"""Classic segmentation, blockwise: filters with declared halos, thresholds from global
statistics, step-DAG workflows and presets."""
