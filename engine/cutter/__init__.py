"""cellcutter's workflow: markers, the self-supervised cutter loss, training and blockwise
instance assembly (``voxelmill cutter``)."""
