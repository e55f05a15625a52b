"""Deep-learning building blocks in plain torch: U-Net models, masked losses and metrics."""
