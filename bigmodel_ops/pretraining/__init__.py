"""The pretraining library of the `pretrain` stage: token-shard loading, masking, the Lightning module,
checkpoints and callbacks, and the export of the pretrained backbone."""
