"""What a run keeps on disk: checkpoints, tensor files, the folder lock and the exported student."""
