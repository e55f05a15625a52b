"""BioImage Model Zoo packages: export voxelmill checkpoints, read and run packages."""
