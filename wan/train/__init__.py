"""`nabla-wan finetune`: the parser, the config, the trainer, flow matching, data and the latent cache,
checkpoints, FSDP2 and validation."""
